"""Folders a command writes: never aliasing what it reads, replaced as a whole, or claimed.

`OutputFolder` builds every output path and refuses one that is an input; `folder_replaced`
swaps a finished folder in for the old one in one step; `claim_folder` makes a new folder this
command's, even against another command started at the same instant.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from common.atomic import create_exclusive, signals_deferred, stop_point
from common.errors import CoTexNetError
from common.shared_files import taking_turns

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputFolder:
    """A folder a command writes, checked never to alias what the command reads.

    `path(name)` builds every output path from a relative name that cannot leave the folder (no
    absolute path, no "..", no symlinked folder leading out), and refuses one that is, after
    symlinks, one of `input_files` or inside one of `input_folders` (folders whose every file is
    an input: a dataset's images/ and masks/). `label` prefixes the folder in messages (the
    option that named it)."""

    def __init__(self, folder: str | os.PathLike, label: str = "", input_folders: Iterable = (),
                 input_files: Iterable = ()):
        self.folder, self.label = Path(folder), f"{label} " if label else ""
        self._root = self.folder.resolve()
        self._input_folders = [Path(path).resolve() for path in input_folders]
        self._input_files = {Path(path).resolve() for path in input_files}
        self._check(self._root, self.folder)

    def _check(self, real: Path, shown: Path) -> None:
        for folder in self._input_folders:
            if real == folder or folder in real.parents:
                raise CoTexNetError(f"{self.label}{shown}: inside the input folder {folder}; choose another folder "
                                    "(outputs would mix with, or overwrite, the inputs); nothing written")
        if real in self._input_files:
            raise CoTexNetError(f"{self.label}{shown}: is the input {real}; choose another output; nothing written")

    def check_holds_no_input(self) -> None:
        """For a folder replaced as a whole: it must not hold an input."""
        for path in (*self._input_folders, *self._input_files):
            if self._root in path.parents:
                raise CoTexNetError(f"{self.label}{self.folder}: holds the input {path}, and is replaced as a whole; "
                                    "choose another folder; nothing written")

    def path(self, name: str) -> Path:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise CoTexNetError(f"{name}: an output name must stay inside {self.folder} (no absolute path, no ..)")
        path = self.folder.joinpath(*relative.parts)
        real = path.resolve()
        if self._root not in real.parents:
            raise CoTexNetError(f"{path}: leads out of {self.folder} through a symlink (to {real}); "
                                "remove the link; nothing written")
        self._check(real, path)
        return path


def _swap_in(new: Path, target: Path) -> Path:
    """Put folder `new` in place of `target`; returns where the old `target` went (to delete).
    Linux swaps the two names in one step (renameat2); elsewhere two renames leave an instant
    without `target`."""
    if not target.exists():
        os.rename(new, target)
        return new
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target),
                                           _RENAME_EXCHANGE) == 0:
        return new
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(new, target)
    return old


@contextlib.contextmanager
def folder_replaced(target: OutputFolder, marker: str) -> Iterator[OutputFolder]:
    """Write a folder that replaces `target` as a whole: the block writes into a hidden folder
    beside it, which then takes `target`'s place in one step, so that a reader (or a killed
    command) leaves the old folder or the new one; on an error or a stop it is removed.

    `target` must hold no input and be absent, empty or hold `marker` (a file the command
    writes): another folder is never replaced. Commands writing one target take turns."""
    folder = target.folder
    target.check_holds_no_input()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CoTexNetError(f"{target.label}{folder}: cannot write here ({err.strerror})") from err
    with taking_turns(folder.parent, folder.name, create=True):
        if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / marker).is_file())):
            raise CoTexNetError(f"{target.label}{folder}: exists and is not an output of this command (no {marker}); "
                                "it would be replaced as a whole: choose another folder; nothing written")
        for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # a killed command's
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            yield OutputFolder(staging, target.label, target._input_folders, target._input_files)
            stop_point(f"{folder.name}:staged")
            with signals_deferred():
                old = _swap_in(staging, folder)
            stop_point(f"{folder.name}:replaced")
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def claim_folder(folder: str | os.PathLike, file: str, data: bytes, next_free: bool) -> Path:
    """Make `folder` this command's by creating `folder/file` exclusively (`create_exclusive`).
    Taken by another command (even one started at the same instant): with `next_free`, the first
    free `<folder>-2`, `-3`, ... (a folder new to this command, never one that is there); without,
    a one-line error."""
    folder = Path(folder)
    candidate, n = folder, 1
    while True:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir(exist_ok=not next_free)
            if create_exclusive(candidate / file, data):
                return candidate
        except FileExistsError:
            pass
        except OSError as err:
            raise CoTexNetError(f"{candidate}: cannot write here ({err.strerror})") from err
        if not next_free:
            raise CoTexNetError(f"{folder}: taken by another run started at the same time; choose another name")
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
