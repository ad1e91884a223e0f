"""Files written whole: under a temporary name in their folder, then renamed into place.

A reader (or a restarted command) therefore sees the previous complete file or the new one,
never a half-written one. What a killed command leaves is a temporary file, which the next run
of the stage that owns the folder removes (`remove_stale_temporaries`). The named steps between
which the tests kill a writer are `stop_point`s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.errors import CoTexNetError

_UMASK = os.umask(0)
os.umask(_UMASK)
# The temporary names, ".<name>.<8 random characters>.tmp<suffix>": what a killed command can
# leave, and only that, is cleaned by `remove_stale_temporaries`.
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp(\.[^./]+)?")


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


def temporary_beside(path: Path) -> Path:
    """A new empty file with a temporary name beside `path` (its folder made if missing), as
    readable as any output (mkstemp makes 0600)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
    except OSError as err:
        raise CoTexNetError(f"{path.parent}: cannot write here ({err.strerror})") from err
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, else delete it."""
    path, tmp = Path(path), None
    try:
        # Created and named with Ctrl-C and SIGTERM held: a stop is raised when they are let go,
        # inside this `try`, which then removes the temporary.
        with signals_deferred():
            tmp = temporary_beside(path)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CoTexNetError(f"{path}: could not be written ({err.strerror})") from err
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> int:
    """Delete the temporary files of writes that a kill interrupted under `folder` (with `names`:
    only those of these file names, directly in `folder`); returns how many. Call it only where
    one command writes at a time (a rerun of the stage that owns the folder or the names)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    names = None if names is None else set(names)
    found = folder.rglob(".*.tmp*") if names is None else folder.glob(".*.tmp*")
    stale = [path for path in found if path.is_file() and (match := _TEMPORARY.fullmatch(path.name))
             and (names is None or match.group(1) in names)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


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


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Write `path` whole, only if no file is there: False when one is (another command's, even
    one written at the same instant). The content is complete before the name appears."""
    path, tmp = Path(path), None
    try:
        with signals_deferred():  # as in atomic_path
            tmp = temporary_beside(path)
        tmp.write_bytes(data)
        os.link(tmp, path)  # fails if `path` exists: the exclusive step
        return True
    except FileExistsError:
        return False
    except OSError as err:
        raise CoTexNetError(f"{path}: could not be written ({err.strerror})") from err
    finally:
        if tmp is not None:
            tmp.unlink()
