"""File helpers: atomic writes, and CSV reading with one-line errors.

Atomic writes: a file is written under a temporary name in its folder, then renamed.

A reader (or a restarted run) therefore sees either the previous complete file or the new
complete file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as err:
        raise CoTexNetError(f"{path.parent}: cannot write here ({err.strerror})") from err
    tmp = Path(tmp)
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
