"""The images a user names on the command line: files, folders (searched recursively) and glob patterns."""

import glob
import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from imgcls.errors import UserError


def find_images(names: list[str]) -> list[Path]:
    """Expand files, folders and glob patterns into image files, in the order given; each folder or glob sorted.

    In folders and glob matches, only the files training's ImageFolder would read are kept (by extension, hidden
    files skipped); a file named directly is always kept.
    """
    found: list[Path] = []
    for name in names:
        path = Path(name).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            images = _images_in([path])
            if not images:
                raise UserError(f"{name}: no image files in this folder ({' '.join(IMG_EXTENSIONS)})")
            found += images
        elif any(char in name for char in "*?["):  # a pattern the shell left alone, e.g. quoted "photos/**/*.jpg"
            images = _images_in([Path(match) for match in sorted(glob.glob(os.path.expanduser(name), recursive=True))])
            if not images:
                raise UserError(f"{name}: matches no image files")
            found += images
        else:
            raise UserError(f"{name}: no such file or folder")
    return found


def _images_in(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        found += [file for file in candidates if _is_image(file) and file.is_file()]
    return found


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")
