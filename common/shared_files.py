"""Sets of files that several commands write (the split files): they take turns, and a set is
replaced as one.

`taking_turns` holds a set's lock file; `publish` replaces its files so that a reader under the
lock finds the old set or the new one, whatever stops the writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from common.atomic import remove_stale_temporaries, signals_deferred, stop_point, temporary_beside, write_json
from common.errors import CoTexNetError

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
                with signals_deferred():  # recorded as soon as it exists, for the `finally` below
                    staged[file] = temporary_beside(folder / file).name
                (folder / staged[file]).write_bytes(data)
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
