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
            found += _images_in([path], f"{name}: no image files in this folder")
        elif any(char in name for char in "*?["):  # a pattern the shell left alone, e.g. quoted "photos/**/*.jpg"
            matches = [Path(match) for match in sorted(glob.glob(os.path.expanduser(name), recursive=True))]
            found += _images_in(matches, f"{name}: matches no image files")
        else:
            raise UserError(f"{name}: no such file or folder")
    return found


def _images_in(paths: list[Path], none_found: str) -> list[Path]:
    """The image files in ``paths`` (folders searched); ``UserError(none_found, ...)`` if there are none."""
    files = [file for path in paths for file in (sorted(path.rglob("*")) if path.is_dir() else [path])]
    files = [file for file in files if file.is_file() and not file.name.startswith(".")]
    found = [file for file in files if file.suffix.lower() in IMG_EXTENSIONS]
    if not found:
        kinds = ", ".join(sorted({file.suffix.lower() or file.name for file in files}))
        unread = f"; {len(files)} other files are not read ({kinds}): name one to classify it anyway" if files else ""
        raise UserError(f"{none_found} ({' '.join(IMG_EXTENSIONS)}, as training reads){unread}")
    return found
