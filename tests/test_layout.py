"""The shape of the package, and the ways a forker changes it: which way imports point, deleting the planner, the
documented rename, and a normal (non-editable) install."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import QUICK, REPO, python, shell_env

PACKAGE = REPO / "src" / "imgcls"
# What each part may import of the others. The core (cli, model, resume, runtime) sits on top of the parts; below
# them all are checkpoints (and shards), errors and compat, which import nothing else of the project.
BASE = {"errors", "compat", "checkpoints", "shards"}
MAY_IMPORT = {
    "errors": set(),
    "compat": set(),
    "shards": {"errors", "compat"},
    "checkpoints": {"errors", "compat", "shards"},
    "data": BASE,
    "backbones": BASE,
    "parallel": BASE,
    "inference": BASE | {"backbones", "data"},
    "callbacks": BASE | {"data", "parallel"},
    "planner": BASE | {"backbones", "parallel"},
}


def imports(path: Path) -> set[str]:
    """The imgcls modules ``path`` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgcls"):
            found |= {f"{node.module}.{a.name}" if node.module == "imgcls" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("imgcls")}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def test_imports_point_down_and_never_in_a_circle() -> None:
    graph = {
        module_name(path): imports(path)
        for path in PACKAGE.rglob("*.py")
        if path.parent != PACKAGE or path.stem != "__init__"
    }
    for module, imported in graph.items():
        part = module.split(".")[1]
        for target in imported:
            other = target.split(".")[1]
            if part in MAY_IMPORT and other != part:
                assert other in MAY_IMPORT[part], f"{module} imports {target}"

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"an import cycle: {' -> '.join((*stack, module))}"
        for target in graph.get(module, ()):
            visit(target, (*stack, module))

    for module in graph:
        visit(module, ())


def copy_tracked_files(target: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked or to be committed), in a git repository."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True, timeout=60)
    subprocess.run(["git", "add", "-A"], cwd=target, check=True, timeout=60)
    return target


@pytest.mark.slow
def test_deleting_the_planner_folder_leaves_training_working(tmp_path: Path) -> None:
    clone = copy_tracked_files(tmp_path / "clone")
    shutil.rmtree(clone / "src" / "imgcls" / "planner")
    env = shell_env(PYTHONPATH=str(clone / "src"))  # before the editable install's path
    result = python(str(clone / "train.py"), *QUICK, cwd=tmp_path, env=env, deadline=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "logs" / "version_0" / "checkpoints" / "best.ckpt").is_file()
    assert str(clone / "src" / "imgcls") in python("-c", "import imgcls; print(imgcls.__path__[0])", cwd=tmp_path,
                                                   env=env).stdout  # fmt: skip
    gone = python(str(clone / "train.py"), "--plan", cwd=tmp_path, env=env, deadline=120)
    assert gone.returncode != 0 and "Traceback" not in gone.stderr and "--plan" in gone.stderr


@pytest.mark.slow
def test_the_documented_rename_gives_a_project_whose_tests_pass(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    command = readme.split("<!-- rename -->", 2)[1].strip().removeprefix("```bash").removesuffix("```").strip()
    clone = copy_tracked_files(tmp_path / "clone")
    subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=clone, check=True, timeout=120)
    assert not (clone / "src" / "imgcls").exists() and (clone / "src" / "myproject" / "cli.py").is_file()
    leftover = subprocess.run(["git", "grep", "-l", "imgcls"], cwd=clone, capture_output=True, text=True, timeout=60)
    assert leftover.stdout == "", leftover.stdout
    env = shell_env(PYTHONPATH=str(clone / "src"))
    # A sample that trains, resumes, parses every config file (their class paths name the package) and checks the
    # import rules, in the renamed package.
    tests = [
        "tests/test_train.py",
        "-k",
        "resume or configs",
        "tests/test_layout.py::test_imports_point_down_and_never_in_a_circle",
    ]
    result = python("-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, cwd=clone, env=env, deadline=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert (
        " passed" in result.stdout
        and "myproject"
        in python("-c", "import myproject.cli; print(myproject.cli.__file__)", cwd=clone, env=env).stdout
    )


@pytest.mark.slow
def test_a_normal_install_trains_with_the_default_config(tmp_path: Path) -> None:
    site = tmp_path / "site"  # a wheel built and installed into its own folder: no link back to src/
    clone = copy_tracked_files(tmp_path / "clone")
    built = python(
        "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(clone),
        cwd=tmp_path, deadline=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert not (site / "imgcls" / "configs").exists()
    env = shell_env(PYTHONPATH=str(site))
    where = python("-c", "import imgcls.cli; print(imgcls.cli.__file__)", cwd=tmp_path, env=env).stdout
    assert where.startswith(str(site)), where
    shutil.rmtree(clone / "src")  # train.py and configs/ stay, as in a checkout whose package is installed
    result = python(str(clone / "train.py"), *QUICK, cwd=tmp_path, env=env, deadline=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "logs" / "version_0" / "config.yaml").read_text()
    assert "crop_size: 32" in config and "max_epochs: 1" in config  # default.yaml under the flags
    assert not (tmp_path / "lightning_logs").exists()


def test_a_missing_default_config_is_an_error(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text((REPO / "train.py").read_text())  # beside no configs/ folder
    result = python(str(script), *QUICK, cwd=tmp_path, env=shell_env(), deadline=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'configs' / 'default.yaml'}: ")
