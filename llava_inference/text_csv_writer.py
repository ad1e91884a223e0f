"""The text CSV of stage 2, written resumably, beside a record of the settings its rows were made with.

CSV columns: the paper's `roi_name,text,text_prompt,number,location,shape,size,color` (the
last five are concept-dictionary codes, see attributes.py), then
- `source`: `llava` (all five from the model), `geometry` (all five from the mask),
  `hybrid` (shape and color from the model, the rest from the mask) or `fallback` (the model
  gave no valid answer within the allowed tries, all five from the mask);
- `tries`: model answers drawn for the ROI (0 for geometry).
An ROI with an empty mask gets number 0, codes -1 and the sentence "no <keyword>s in the image."
(the model is not asked).

While a run goes, each result is appended to `<out stem>.partial[-<shard>].csv` and flushed, so
a killed run loses at most the line being written; a rerun reads the partial files and skips
those ROIs. The final CSV is written atomically, and only then are the partial files removed.
`<out stem>.settings.json` beside it records the options the rows were made with (describer,
keywords, and a model's settings: `text_stage.recorded_settings`): a rerun with other options is
refused instead of mixing rows of two settings.
`--overwrite` keeps the earlier CSV until the new one replaces it (a stopped overwrite leaves the
old CSV, and its rerun goes on with the new rows only): the record says so (`REPLACING`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path

import pandas as pd

from common.atomic import atomic_path, remove_stale_temporaries, write_json
from common.errors import CoTexNetError, not_utf8
from llava_inference.attributes import KEYS, Attributes
from llava_inference.sentence_template import empty_sentence, sentence

PAPER_COLUMNS = ("roi_name", "text", "text_prompt", *KEYS)
COLUMNS = (*PAPER_COLUMNS, "source", "tries")
REPLACING = "replacing_earlier_csv"  # in the record while an --overwrite runs: the CSV's rows are not its


def make_row(roi_name: str, attrs: Attributes, keyword: str, source: str, tries: int) -> dict:
    return {"roi_name": roi_name, "text": attrs.to_json(), "text_prompt": sentence(attrs, keyword),
            **attrs.codes(), "source": source, "tries": tries}


def empty_row(roi_name: str, keyword: str) -> dict:
    """The row of an ROI whose mask is empty (a category absent from an image): nothing to describe, codes -1."""
    return {"roi_name": roi_name, "text": json.dumps({"number": 0}), "text_prompt": empty_sentence(keyword),
            "number": 0, **{k: -1 for k in KEYS[1:]}, "source": "geometry", "tries": 0}


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.stem}.partial*.csv"))


def settings_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.settings.json")


def _options(settings: dict) -> str:
    """The recorded settings as the get_text.py options that give them."""
    flags = []
    for key, value in settings.items():
        if key == "constrain":
            flags += [] if value else ["--no-constrain"]
        elif key == "backend":  # as constrain: named where it is not get_text.py's default
            flags += [] if value == "transformers" else [f"--backend {value}"]
        elif key == "keywords":
            flags.append(f"--keywords '{','.join(value or ())}'")
        else:
            flags.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(flags)


def _read_complete_rows(path: Path, partial: bool) -> list[dict]:
    """Rows of one of our CSVs. In a partial CSV a last line cut by a kill is dropped (and cut
    off the file); a final CSV was written whole (atomically), so it is read as it is."""
    try:
        data = path.read_bytes()
        if partial and data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            path.write_bytes(data)
    except IsADirectoryError as err:
        raise CoTexNetError(f"{path}: a folder, not a CSV file; move it away or pass another --out") from err
    except OSError as err:
        raise CoTexNetError(f"{path}: cannot be {'rewritten' if partial else 'read'} ({err.strerror}); "
                            "check its permissions, or move it away and rerun") from err
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of the first column
    except UnicodeDecodeError as err:
        raise not_utf8(path, err, "move it away or rerun with --overwrite") from err
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is not None and list(reader.fieldnames) != list(COLUMNS):
        raise CoTexNetError(f"{path}: columns {reader.fieldnames} are not {list(COLUMNS)}; "
                            "move it away or rerun with --overwrite")
    return [row for row in reader if None not in row.values()]


def _recorded_settings(path: Path) -> dict | None:
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise CoTexNetError(f"{path}: unreadable record of the earlier run's options ({err}); rerun with "
                            "--overwrite to describe every ROI again") from err
    return recorded if isinstance(recorded, dict) else {}


def _replacing(out: Path) -> bool:
    """Whether an --overwrite of `out` is under way (its rows are then not the new run's)."""
    record = settings_path(out)
    return record.is_file() and bool((_recorded_settings(record) or {}).get(REPLACING))


def start_output(out: str | Path, settings: dict, overwrite: bool, earlier_defaults: dict | None = None) -> None:
    """Before the first row (main process only): remove what a killed write of this CSV left;
    with `overwrite` remove the earlier final and partial CSVs, else refuse their rows if they were
    made with other `settings`; then record `settings` beside the CSV. `earlier_defaults`: the
    value of an option that a record written before the option existed lacks."""
    out = Path(out)
    record = settings_path(out)
    if out.is_dir():
        raise CoTexNetError(f"{out}: a folder, not a CSV file; move it away or pass another --out")
    remove_stale_temporaries(out.parent, (out.name, record.name))
    replacing = overwrite or _replacing(out)
    earlier = ([out] if out.exists() and not replacing else []) + _partials(out)
    if overwrite:  # the earlier CSV stays until the new one replaces it
        for path in _partials(out):
            try:
                path.unlink()
            except OSError as err:
                raise CoTexNetError(f"{path}: cannot be removed for --overwrite ({err.strerror})") from err
    else:
        rows = len({row["roi_name"] for path in earlier for row in _read_complete_rows(path, partial=path != out)})
        recorded = _recorded_settings(record) if rows else settings
        if recorded is not None:
            recorded = {**recorded, **{k: v for k, v in (earlier_defaults or {}).items()
                                       if k in settings and k not in recorded}}
        if recorded is None:
            print(f"warning: {out}: {rows} rows of an earlier run are kept, but the options they were made "
                  f"with are not recorded (now {_options(settings)}); --overwrite redoes them", file=sys.stderr)
        elif {key: recorded.get(key) for key in settings} != settings:
            raise CoTexNetError(f"{out}: its {rows} earlier rows were made with {_options(recorded)}, this run asks "
                                f"for {_options(settings)}; rerun with --overwrite to describe every ROI again, "
                                "or with the earlier options to continue")
    write_json(record, {**settings, REPLACING: True} if replacing else settings)


class ResultWriter:
    """Appends finished rows to a partial CSV, knows which ROIs are done, writes the final CSV."""

    def __init__(self, out: str | Path, shard: str = ""):
        self.out = Path(out)
        self.partial = self.out.with_name(f"{self.out.stem}.partial{shard}.csv")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CoTexNetError(f"{self.out.parent}: cannot write here ({err.strerror})") from err
        self.rows = self._finished_rows()
        new = not self.partial.exists() or self.partial.stat().st_size == 0
        try:
            self._file = self.partial.open("a", newline="", encoding="utf-8")
        except OSError as err:
            raise CoTexNetError(f"{self.partial}: cannot be written ({err.strerror})") from err
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        if new:
            self._writer.writeheader()
            self._file.flush()

    def _finished_rows(self) -> dict[str, dict]:
        rows = {}
        # A finished earlier run counts as done too (unless --overwrite replaces it); partial rows are newer.
        if self.out.exists() and not _replacing(self.out):
            rows.update({row["roi_name"]: row for row in _read_complete_rows(self.out, partial=False)})
        for path in _partials(self.out):
            rows.update({row["roi_name"]: row for row in _read_complete_rows(path, partial=True)})
        return rows

    def add(self, row: dict) -> None:
        try:
            self._writer.writerow(row)
            self._file.flush()
        except OSError as err:  # a full disk or quota: the rows flushed so far stay for the rerun
            raise CoTexNetError(f"{self.partial}: could not be written ({err.strerror}); "
                                "free space and rerun to continue") from err
        self.rows[row["roi_name"]] = {k: str(v) for k, v in row.items()}

    def close(self) -> None:
        with contextlib.suppress(OSError):  # every row is flushed in add(): only a write it reported can fail
            self._file.close()

    def finalize(self, order: list[str]) -> pd.DataFrame:
        """Write the final CSV (rows in `order`, each once) atomically, with the rows other processes
        (shards) wrote to their partial files; remove the partial files."""
        self.close()
        self.rows.update(self._finished_rows())
        missing = [name for name in order if name not in self.rows]
        if missing:
            raise CoTexNetError(f"{self.out}: {len(missing)} ROIs have no result yet, e.g. {missing[0]}; rerun to finish")
        table = pd.DataFrame([self.rows[name] for name in order], columns=COLUMNS)
        with atomic_path(self.out) as tmp:
            table.to_csv(tmp, index=False)
        if _replacing(self.out):  # a kill before this line: the rerun describes them again
            recorded = _recorded_settings(settings_path(self.out))
            write_json(settings_path(self.out), {key: value for key, value in recorded.items() if key != REPLACING})
        for path in _partials(self.out):
            path.unlink()
        return table
