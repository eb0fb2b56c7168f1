"""Walking class folders through symbolic links, as ImageFolder does, refusing loops and files reached twice.

torchvision's ImageFolder walks each class folder with ``os.walk(followlinks=True)``. Links to class folders or
files on other disks are worth keeping, but nothing stops a link back to a folder above it (``cat/loop -> .`` read 12
images as 492) or one that reaches a file a second time, under another class or split (``dog/up -> ..`` read every
cat as a dog too; ``val -> train`` validates on the training images). ``FolderWalk`` lists the same files in the same
order, refuses a loop as it meets it and, once every split is walked, files reached twice.

A file is identified by its real path (``os.path.realpath``), so a file reached through links is one file; hard links
and copies are files of their own, as they are to any tool that follows paths. Resolving every file costs about as
much as the header check itself (18 µs a file measured), so real paths are worked out once per folder, and a file
link's from its target's folder: a folder reached twice reaches all its files twice, and a file link is compared with
the folder of its target.
"""

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from imgcls.errors import UserError

ROLES = {"train": "trained on", "val": "validated on", "test": "tested on"}


@dataclass(frozen=True)
class Place:
    """A path as the walk reached it: the split and the class it is read as."""

    path: str
    split: str
    label: str

    def __str__(self) -> str:
        return f"{self.path} ({self.split}, class {self.label})"


class FolderWalk:
    """One walk over the class folders of all splits of a dataset, remembering what it needs to find files read twice.

    Memory grows with folders and links, not files: a folder's real path, where it was first reached, and each file
    link's target.
    """

    def __init__(self) -> None:
        self.folders: dict[str, Place] = {}  # real path -> where the folder was first reached
        self.repeats: list[tuple[Place, Place, list[str]]] = []  # a folder reached again: first, again, its files
        self.links: list[tuple[str, Place]] = []  # each file link: its target's real path, where it was reached
        self.heads: dict[str, str] = {}  # a folder that file links name -> its real path

    def files(self, class_dir: str, split: str, label: str) -> list[str]:
        """The files under ``class_dir``, links followed, sorted as ImageFolder sorts ``os.walk``'s listing."""
        found: list[tuple[str, list[str]]] = []
        real = os.path.realpath(class_dir)
        if os.path.islink(class_dir):  # a class folder linked to the split's folder or one above it
            _refuse_loop(class_dir, real, (os.path.realpath(os.path.dirname(class_dir) or "."),))
        todo = [(class_dir, (real,))]  # a folder, and the real paths from the class folder to it
        while todo:
            folder, chain = todo.pop()
            try:
                with os.scandir(folder) as scan:
                    entries = list(scan)
            except OSError as error:  # os.walk passes over such folders, and their images, without a word
                raise UserError(f"{folder}: cannot read this folder ({error.strerror}); fix its permissions") from error
            names, plain = [], []  # the files' names; those that are not links
            for entry in entries:
                if entry.is_dir():  # follows links, as os.walk(followlinks=True) does
                    real = os.path.join(chain[-1], entry.name)
                    if entry.is_symlink():  # only a link can lead back up
                        real = os.path.realpath(entry.path)
                        _refuse_loop(entry.path, real, chain)
                    todo.append((entry.path, (*chain, real)))
                    continue
                names.append(entry.name)
                if entry.is_symlink():
                    real = self._real_target(entry.path, chain[-1])
                    if real is not None:  # else a broken link, which the image checks name
                        self.links.append((real, Place(entry.path, split, label)))
                else:
                    plain.append(entry.name)
            found.append((folder, names))
            place = Place(folder, split, label)
            first = self.folders.setdefault(chain[-1], place)
            if first is not place:
                self.repeats.append((first, place, plain))
        return [os.path.join(folder, name) for folder, names in sorted(found) for name in sorted(names)]

    def refuse_files_read_twice(self, is_sample: Callable[[str], bool], carved: bool) -> None:
        """Raise ``UserError`` naming a file (and counting the others) that the walk reached by two paths.

        ``is_sample`` says which paths are read as images; ``carved``: validation is held out of ``train`` at random.
        """
        twice = [(Place(os.path.join(first.path, name), first.split, first.label),
                  Place(os.path.join(again.path, name), again.split, again.label))
                 for first, again, names in self.repeats for name in names if is_sample(name)]  # fmt: skip
        targets: dict[str, Place] = {}
        for real, link in self.links:
            if not is_sample(link.path):
                continue
            first = targets.setdefault(real, link)
            if first is not link:  # two links to one file
                twice.append((first, link))
                continue
            head, name = os.path.split(real)
            folder = self.folders.get(head)  # the target's folder, if the walk went through it: it read the target too
            if folder is not None and is_sample(name):
                twice.append((Place(os.path.join(folder.path, name), folder.split, folder.label), link))
        if twice:
            first, again = min(twice, key=lambda pair: (pair[1].path, pair[0].path))  # not the listing's order
            more = f" ({len(twice) - 1} more files are reached twice)" if len(twice) > 1 else ""
            raise UserError(
                f"{first} and {again} are one file, reached through a symbolic link: {_harm(first, again, carved)}; "
                f"remove the link or the extra path, so that every image is read once{more}"
            )

    def _real_target(self, link: str, folder: str) -> str | None:
        """The real path of the file that ``link``, in the folder whose real path is ``folder``, leads to; ``None`` if
        it is missing. One readlink and one lstat: the target's folder is resolved once for all the links into it."""
        head, name = os.path.split(os.path.join(folder, os.readlink(link)))  # an absolute target replaces folder
        try:
            if stat.S_ISLNK(os.lstat(os.path.join(head, name)).st_mode):  # a link to a link: resolve the whole chain
                real = os.path.realpath(link)
                return real if os.path.exists(real) else None
        except OSError:
            return None
        if head not in self.heads:
            self.heads[head] = os.path.realpath(head)
        return os.path.join(self.heads[head], name)


def _refuse_loop(link: str, real: str, chain: tuple[str, ...]) -> None:
    """Refuse a folder that is, or holds, one of the folders the walk is in: it would be walked without end."""
    if any(outer == real or outer.startswith(real.rstrip(os.sep) + os.sep) for outer in chain):
        raise UserError(
            f"{link} is a link to {os.readlink(link)} ({_known_as(real, link)}), a folder that holds it: the class "
            "folders would be read round and round through it, every image many times; remove the link or point it "
            "elsewhere"
        )


def _known_as(real: str, link: str) -> str:
    """The name of the folder ``real`` as a folder above ``link``'s path, else ``real`` itself."""
    path = os.path.dirname(link)
    while os.path.realpath(path or ".") != real:
        if not path or os.path.dirname(path) == path:
            return real
        path = os.path.dirname(path)
    return path or "."


def _harm(first: Place, again: Place, carved: bool) -> str:
    """What reading one image as both places would do to the run."""
    labels = f" as both {first.label} and {again.label}" if first.label != again.label else ""
    if first.split != again.split:
        return f"it would be both {ROLES[first.split]} and {ROLES[again.split]}{labels}, which overstates accuracy"
    held_out = ", or both trained and validated on (--data.val_fraction holds out images at random)" if carved else ""
    return f"it would be {ROLES[first.split]} twice{labels}{held_out}"
