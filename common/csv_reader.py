"""The CSV reader of every stage: strings as written, and one-line errors naming the file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from common.errors import CoTexNetError, not_utf8


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
