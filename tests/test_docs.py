"""The commands the README and docs/ show: every `python train.py ...` line parses, flags and config files alike."""

import re
import shlex

import pytest
from helpers import REPO, train

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = re.compile(r"\s(?:#|>|\||;|&&)\s.*$|\s\\$")  # a comment, a redirection, a pipe, the next command


def commands() -> list[tuple[str, str]]:
    """(page, flags) of every `python train.py FLAGS` in the pages, in code spans and code blocks."""
    found = []
    for page in PAGES:
        for line in page.read_text().splitlines():
            for match in re.finditer(r"python train\.py([^`\n]*)", line):
                flags = SHELL.sub("", match.group(1)).strip()
                found.append((page.name, flags))
    return found


@pytest.mark.parametrize(("page", "flags"), commands())
def test_documented_command_parses(page: str, flags: str, capsys: pytest.CaptureFixture) -> None:
    args = [arg for arg in shlex.split(flags) if arg != "..."]
    args = [str(REPO / arg) if arg.startswith("configs/") else arg for arg in args]
    with pytest.raises(SystemExit) as done:
        train([*args, "--print_config"])
    assert done.value.code in (0, None), f"{page}: python train.py {flags}\n{capsys.readouterr().err[-2000:]}"


def test_every_page_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    assert all(f"docs/{page.name}" in readme for page in PAGES[1:])
    assert "benchmarks/README.md" in readme and "benchmarks/RESULTS.md" in readme
