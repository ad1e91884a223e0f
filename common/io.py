"""File helpers: atomic writes, sets of files replaced as one, writers that take turns, output
folders that never alias an input, and CSV reading with one-line errors.

Atomic writes: a file is written under a temporary name in its folder, then renamed.
A reader (or a restarted run) therefore sees either the previous complete file or the new
complete file, never a half-written one. Files that belong together (the split files) are
replaced as one set (`publish`), by commands that take turns (`taking_turns`); a folder that a
command writes as a whole (an evaluation) is swapped in as one (`folder_replaced`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import pandas as pd
from filelock import FileLock, Timeout

from common.errors import CoTexNetError

_UMASK = os.umask(0)
os.umask(_UMASK)


def not_utf8(path, err: UnicodeDecodeError, fix: str = "save it as UTF-8") -> CoTexNetError:
    """The one message for a text file that is not UTF-8, with the first bad byte."""
    return CoTexNetError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#x} at {err.start}); {fix}")


# atomic_path's temporary names, ".<name>.<8 random characters>.tmp<suffix>": what a killed
# command can leave, and only that, is cleaned by `remove_stale_temporaries`.
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp(\.[^./]+)?")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with signals_deferred():  # a stop between creating the temporary and the `try` below would leave it
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
            tmp = Path(tmp)
    except OSError as err:
        raise CoTexNetError(f"{path.parent}: cannot write here ({err.strerror})") from err
    try:
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should be as readable as any file
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CoTexNetError(f"{path}: could not be written ({err.strerror})") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def leftovers(targets: Iterable[str | os.PathLike]) -> list[Path]:
    """The temporary files that killed atomic writes of `targets` left beside them; each folder
    is listed once."""
    by_folder: dict[Path, set[str]] = {}
    for target in map(Path, targets):
        by_folder.setdefault(target.parent, set()).add(target.name)
    found = []
    for folder, names in by_folder.items():
        if folder.is_dir():
            for entry in os.scandir(folder):
                match = _TEMPORARY.fullmatch(entry.name)
                if match and match.group(1) in names:
                    found.append(folder / entry.name)
    return found


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> int:
    """Delete the temporary files of writes that a kill interrupted under `folder` (with `names`:
    only those of these file names, directly in `folder`); returns how many. Call it only where
    one command writes at a time (a rerun of the stage that owns the folder or the names)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    if names is None:
        stale = [path for path in folder.rglob(".*.tmp*") if path.is_file() and _TEMPORARY.fullmatch(path.name)]
    else:
        stale = leftovers(folder / name for name in names)
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def read_csv(path: str | os.PathLike, columns: Iterable[str] = (), missing_hint: str = "") -> pd.DataFrame:
    """A CSV as strings (empty cells stay ""), or a one-line error naming the file: missing
    (`missing_hint` says how to make it), not UTF-8, unparsable, or without `columns`."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise CoTexNetError(f"{path}: no such file{' (' + missing_hint + ')' if missing_hint else ''}") from err
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CoTexNetError(f"{path}: not a readable CSV ({err})") from err
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise CoTexNetError(f"{path}: missing columns {missing} (has {list(table.columns)})")
    return table


def write_image(path: str | os.PathLike, array, params: Iterable[int] = ()) -> None:
    """An image file (format from the suffix; `array` as OpenCV takes it: BGR or one channel)."""
    import cv2  # only the image-writing stages need OpenCV

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array, list(params)):
            raise CoTexNetError(f"{path}: could not be written")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- kills and stops between steps

def stop_point(step: str) -> None:
    """A named step of a write that must survive a kill. With COTEXNET_KILL_AT=<step> in the
    environment the command kills itself here (SIGKILL): how the tests stop a writer between two
    steps that no timing can hit."""
    if os.environ.get("COTEXNET_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the end of the block (a few renames), so that a stopped
    command leaves the old set of files or the new one, never part of each."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---------------------------------------------------------------- writers that take turns

_LOCKS: dict[str, FileLock] = {}  # one per lock file: acquiring it again in this process nests


def _holder_of(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


@contextlib.contextmanager
def taking_turns(folder: str | os.PathLike, name: str, files: Iterable[str] = (),
                 create: bool = False) -> Iterator[None]:
    """Hold the lock `<folder>/.<name>.lock` of a set of files: commands that write them take
    turns, and one that must wait says for which command. Once held, a `publish` of the set that
    a kill interrupted is finished, and temporaries of `files` that a kill left are removed.

    `create`: the command writes the folder (made here, or a one-line error). A reader finds no
    folder (its files are missing: its own error says so), or one where no lock can be made
    (read-only: nothing writes there either); it reads without the lock then."""
    folder = Path(folder)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CoTexNetError(f"{folder}: cannot write here ({err.strerror})") from err
    path = folder / f".{name}.lock"
    lock = _LOCKS.setdefault(str(path.absolute()), FileLock(path))
    held = False
    if folder.is_dir():
        first = not lock.is_locked
        holder = _holder_of(path) if first else ""
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                print(f"waiting for {holder or 'another command'}, which holds {path}", file=sys.stderr, flush=True)
                lock.acquire()
            held = True
        except OSError as err:
            if create:
                raise CoTexNetError(f"{folder}: cannot write here ({err.strerror})") from err
        if held and first:
            with contextlib.suppress(OSError):
                path.write_text(f"{Path(sys.argv[0]).name or 'python'} (pid {os.getpid()})\n", encoding="utf-8")
    try:
        if held:
            finish_publish(folder, name, files)
        elif _journal(folder, name).exists():
            raise CoTexNetError(f"{_journal(folder, name)}: an update of {folder}'s files was stopped half-way and "
                                "cannot be finished here (no lock); run the command again where the folder is writable")
        yield
    finally:
        if held:
            lock.release()


# ---------------------------------------------------------------- sets of files replaced as one

def _journal(folder: Path, name: str) -> Path:
    return folder / f".{name}.publish.json"


def _replace_staged(folder: Path, name: str, staged: dict[str, str | None]) -> None:
    for file, tmp in staged.items():
        stop_point(f"{name}:replacing {file}")
        if tmp is None:
            (folder / file).unlink(missing_ok=True)
        elif (folder / tmp).exists():  # an earlier attempt may have renamed it already
            os.replace(folder / tmp, folder / file)
    _journal(folder, name).unlink(missing_ok=True)


def finish_publish(folder: str | os.PathLike, name: str, files: Iterable[str] = ()) -> None:
    """Finish the `publish` of set `name` that a kill stopped after its commit point; remove the
    temporaries of `files` written before it. Only under `taking_turns` of the set."""
    folder = Path(folder)
    journal = _journal(folder, name)
    if journal.exists():
        try:
            staged = json.loads(journal.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError) as err:
            raise CoTexNetError(f"{journal}: unreadable record of an interrupted update ({err})") from err
        _replace_staged(folder, name, staged)
    remove_stale_temporaries(folder, [*files, journal.name])


def publish(folder: str | os.PathLike, name: str, contents: dict[str, bytes | None]) -> None:
    """Replace files of `folder` as one set (content None: the file is removed), so that a
    reader under `taking_turns` finds the old set or the new one, whatever stops the writer.

    Every file is written under a temporary name first; a journal naming them, written atomically,
    is the commit point; then the renames. A kill before the journal leaves the old set (and
    temporaries, removed by the next holder of the lock); after it, the next holder finishes the
    renames. Ctrl-C and SIGTERM wait for the renames. Call it under `taking_turns(folder, name)`."""
    folder, staged, committed = Path(folder), {}, False
    try:
        for file, data in contents.items():
            staged[file] = None
            if data is not None:
                fd, tmp = tempfile.mkstemp(prefix=f".{file}.", suffix=".tmp" + Path(file).suffix, dir=folder)
                staged[file] = Path(tmp).name
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.chmod(tmp, 0o666 & ~_UMASK)
        stop_point(f"{name}:staged")
        with signals_deferred():
            write_json(_journal(folder, name), {"files": staged})
            committed = True
            _replace_staged(folder, name, staged)
    except OSError as err:
        raise CoTexNetError(f"{folder / file}: could not be written ({err.strerror})") from err
    finally:
        if not committed:
            for tmp in filter(None, staged.values()):
                (folder / tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------- folders replaced as one

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Write `path` whole, only if no file is there: False when one is (another command's, even
    one written at the same instant). The content is complete before the name appears."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as err:
        raise CoTexNetError(f"{path.parent}: cannot write here ({err.strerror})") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.link(tmp, path)  # fails if `path` exists: the exclusive step
        return True
    except FileExistsError:
        return False
    except OSError as err:
        raise CoTexNetError(f"{path}: could not be written ({err.strerror})") from err
    finally:
        os.unlink(tmp)


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
