"""Read and validate the users' `;`-separated zone label CSV into a clean DataFrame."""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from csi_dist.core.domain import (
    AHF_COLUMN,
    CSI_COLUMN,
    CSV_SEPARATOR,
    FILE_ID_COLUMN,
    GRADES,
    PATIENT_COLUMN,
    UNKNOWN_CLASS,
    ZONE_NAMES,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = (FILE_ID_COLUMN, *ZONE_NAMES, CSI_COLUMN)
# The CSV line (header = line 1) each row came from, so later errors and skips can point back at the file.
LINE_COLUMN = "csv_line"
EMPTY_VALUES = frozenset({"", "nan", "na", "n/a", "none", "null"})
# What Excel on Windows writes when a CSV is not saved as UTF-8.
FALLBACK_ENCODING = "cp1252"
# The DataFrame column holding, per row, the CSV's extra columns (site, sex, device, ...) as {name: text or None}
METADATA_COLUMN = "metadata"
CSI_MISMATCH_TOLERANCE = 0.01
ROW_ERRORS_SHOWN = 20  # bad rows named in one error before "and N more"


class LabelError(ValueError):
    """A label CSV that cannot be used as it is; the message names the file, line, column and value."""


def _decode(raw: bytes, encoding: str, path: Path) -> str:
    try:
        text = raw.decode(encoding)
    except LookupError as err:
        raise LabelError(f"{path}: unknown encoding {encoding!r}; expected a Python codec name such as "
                         f"'utf-8' or {FALLBACK_ENCODING!r}") from err
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise LabelError(f"{path}: line {line}: byte {raw[err.start:err.start + 1]!r} cannot be decoded as "
                         f"{encoding!r}; re-save the file as UTF-8 or pass the encoding it was saved in") from err
    # A BOM is the spreadsheet's encoding mark, not part of the first column name, whichever utf-8 name was forced.
    return text.removeprefix("\ufeff")


def _read_csv_text(path: Path, encoding: str | None = None) -> str:
    """The text of `path` in `encoding`; None reads UTF-8 (BOM or not) and falls back to cp1252 with a warning."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LabelError(f"{path}: cannot open label CSV: {err}") from err
    if encoding is not None:
        return _decode(raw, encoding, path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # Excel on Windows saves "CSV" in the ANSI code page; guessing it beats failing on every accented name.
        line = raw.count(b"\n", 0, err.start) + 1
        logger.warning("%s: not valid UTF-8 (byte %r on line %d); read as %s, the Windows Excel encoding. "
                       "If names look wrong, give the file's encoding (csi-shards write --encoding, "
                       "read_label_csv(encoding=...)).",
                       path, raw[err.start:err.start + 1], line, FALLBACK_ENCODING)
    return _decode(raw, FALLBACK_ENCODING, path)


def _parse_zone(value: str, where: str) -> int:
    text = value.strip()
    if text.lower() in EMPTY_VALUES:
        return UNKNOWN_CLASS
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number.is_integer() and (int(number) in GRADES or int(number) == UNKNOWN_CLASS):
        return int(number)
    raise LabelError(
        f"{where}: zone grade {value!r} is not valid; expected an integer grade 0-3, "
        f"{UNKNOWN_CLASS} or empty for unknown")


def _parse_csi(value: str, zones: list[int], where: str) -> float:
    text = value.strip()
    if text.lower() in EMPTY_VALUES:
        graded = [grade for grade in zones if grade != UNKNOWN_CLASS]
        return float(np.mean(graded)) if graded else math.nan
    try:
        csi = float(text)
    except ValueError:
        csi = math.nan
    if not (math.isfinite(csi) and min(GRADES) <= csi <= max(GRADES)):
        raise LabelError(f"{where}: csi {value!r} is not valid; expected a number in 0-3 or empty")
    return csi


def _parse_ahf(value: str, where: str) -> float:
    text = value.strip()
    if text.lower() in EMPTY_VALUES:
        return math.nan
    try:
        ahf = float(text)
    except ValueError:
        ahf = math.nan
    if ahf not in (0.0, 1.0):
        raise LabelError(f"{where}: ahf {value!r} is not valid; expected 0, 1 or empty")
    return ahf


def _check_header(header: list[str], path: Path) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if not missing:
        return
    hint = ""
    if len(header) == 1 and ("," in header[0] or "\t" in header[0]):
        found_separator = "," if "," in header[0] else "tab"
        hint = (f" The header looks {found_separator}-separated; this reader expects {CSV_SEPARATOR!r} "
                f"(re-save the file with {CSV_SEPARATOR!r} as separator).")
    raise LabelError(f"{path}: line 1: missing required column(s) {missing}; columns found: {header}.{hint}")


def metadata_columns(header: list[str]) -> list[str]:
    """The header's extra columns in file order: every named column that is not FileID, a zone, csi, patient_id
    or ahf (an unnamed column, e.g. from a trailing separator, is not one)."""
    known = {*REQUIRED_COLUMNS, PATIENT_COLUMN, AHF_COLUMN}
    return list(dict.fromkeys(name for name in header if name and name not in known))


def _metadata_value(value: str) -> str | None:
    text = value.strip()
    return None if text.lower() in EMPTY_VALUES else text


def _parse_row(fields: list[str], header: list[str], column_index: dict[str, int], line: int,
               first_line_of: dict[str, int], extra_columns: list[str]) -> dict:
    """One data row as a record; LabelError naming the line (and column) when it is not valid."""
    if len(fields) != len(header):
        raise LabelError(f"line {line}: found {len(fields)} fields, expected {len(header)} "
                         f"(one per header column, separated by {CSV_SEPARATOR!r})")
    file_id = fields[column_index[FILE_ID_COLUMN]].strip()
    if not file_id:
        raise LabelError(f"line {line}, column {FILE_ID_COLUMN}: empty FileID; expected an image id")
    if file_id in first_line_of:
        raise LabelError(f"duplicate {FILE_ID_COLUMN} {file_id!r} on lines {first_line_of[file_id]} and {line}; "
                         f"expected one row per image")
    first_line_of[file_id] = line
    record = {FILE_ID_COLUMN: file_id}
    for zone in ZONE_NAMES:
        record[zone] = _parse_zone(fields[column_index[zone]], f"line {line}, column {zone}")
    zones = [record[zone] for zone in ZONE_NAMES]
    record[CSI_COLUMN] = _parse_csi(fields[column_index[CSI_COLUMN]], zones, f"line {line}, column {CSI_COLUMN}")
    if PATIENT_COLUMN in column_index:
        record[PATIENT_COLUMN] = fields[column_index[PATIENT_COLUMN]].strip() or None
    if AHF_COLUMN in column_index:
        record[AHF_COLUMN] = _parse_ahf(fields[column_index[AHF_COLUMN]], f"line {line}, column {AHF_COLUMN}")
    if extra_columns:
        record[METADATA_COLUMN] = {name: _metadata_value(fields[column_index[name]]) for name in extra_columns}
    record[LINE_COLUMN] = line
    return record


def _rows_message(path: Path, problems: list[str]) -> str:
    """One bad row: its message as it is; several: all of them (up to ROW_ERRORS_SHOWN), one per line."""
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    more = (f"\n  ... and {len(problems) - ROW_ERRORS_SHOWN} more" if len(problems) > ROW_ERRORS_SHOWN else "")
    return (f"{path}: {len(problems)} bad rows, fix them all and run again:\n  "
            + "\n  ".join(problems[:ROW_ERRORS_SHOWN]) + more)


def read_label_csv(path: str | Path, exclude_ids: set[str] | None = None,
                   encoding: str | None = None) -> pd.DataFrame:
    """Read a label CSV and return one row per image, in file order.

    Columns returned: FileID (str), the six zones of `ZONE_NAMES` (int, 0-3 grades, 4 unknown), csi (float),
    patient_id (str, only when the CSV has that column; empty cells are missing, test with `pd.isna`), ahf (float
    0/1/NaN, only when the CSV has that column), `METADATA_COLUMN` (only when the CSV has other columns: per row a
    dict {column name: text, or None for an empty cell}, in file order; see `metadata_columns`) and `LINE_COLUMN`
    (the CSV line number, header = line 1).

    Coding rules: an empty/NaN zone is 4 (unknown); "2.0" is read as 2; an explicit 4 is accepted as unknown.
    An empty csi is computed as the mean of the graded (non-unknown) zones, NaN when no zone is graded.
    Any other value, a missing required column, a duplicate FileID or a file without data rows raises `LabelError`;
    bad rows are all named in one error (the first ROW_ERRORS_SHOWN, then how many more).
    FileID and patient_id are text exactly as written (surrounding whitespace stripped): "20200101.00" and
    "00123" stay as they are, since they name image files. Rows whose FileID is in `exclude_ids` are dropped.
    `encoding` None reads UTF-8 with or without BOM and falls back to cp1252 with a warning; a given encoding
    is used as is, and bytes it cannot decode raise `LabelError`.
    """
    path = Path(path)
    with io.StringIO(_read_csv_text(path, encoding), newline="") as handle:
        reader = csv.reader(handle, delimiter=CSV_SEPARATOR)
        header = [name.strip() for name in next(reader, [])]
        _check_header(header, path)
        column_index = {name: header.index(name) for name in header}
        has_patient = PATIENT_COLUMN in column_index
        has_ahf = AHF_COLUMN in column_index
        extra_columns = metadata_columns(header)
        records: list[dict] = []
        first_line_of: dict[str, int] = {}
        problems: list[str] = []  # every bad row, so one run names them all
        for fields in reader:
            line = reader.line_num
            if not any(field.strip() for field in fields):
                continue
            try:
                record = _parse_row(fields, header, column_index, line, first_line_of, extra_columns)
            except LabelError as error:
                problems.append(str(error))
                continue
            records.append(record)
    if problems:
        raise LabelError(_rows_message(path, problems))
    if not records:
        raise LabelError(f"{path}: no data rows after the header; expected one row per image")
    columns = [FILE_ID_COLUMN, *ZONE_NAMES, CSI_COLUMN]
    columns += [PATIENT_COLUMN] if has_patient else []
    columns += [AHF_COLUMN] if has_ahf else []
    columns += [METADATA_COLUMN] if extra_columns else []
    labels = pd.DataFrame.from_records(records, columns=[*columns, LINE_COLUMN])
    labels[list(ZONE_NAMES)] = labels[list(ZONE_NAMES)].astype(np.int64)
    _warn_on_csi_mismatch(labels, path)
    return _drop_excluded(labels, exclude_ids, path)


def _warn_on_csi_mismatch(labels: pd.DataFrame, path: Path) -> None:
    zones = labels[list(ZONE_NAMES)].to_numpy(dtype=float)
    zones[zones == UNKNOWN_CLASS] = np.nan
    graded_count = np.sum(~np.isnan(zones), axis=1)
    zone_mean = np.divide(np.nansum(zones, axis=1), graded_count, out=np.full(len(zones), np.nan),
                          where=graded_count > 0)
    mismatch = np.abs(zone_mean - labels[CSI_COLUMN].to_numpy()) > CSI_MISMATCH_TOLERANCE
    if mismatch.any():
        first = labels[LINE_COLUMN].to_numpy()[mismatch][:5].tolist()
        logger.warning("%s: %d row(s) have a csi that differs from the mean of their graded zones by more than %.2f "
                       "(first lines: %s); the csi column is kept as written", path, int(mismatch.sum()),
                       CSI_MISMATCH_TOLERANCE, first)


def _drop_excluded(labels: pd.DataFrame, exclude_ids: set[str] | None, path: Path) -> pd.DataFrame:
    if not exclude_ids:
        return labels
    excluded = {str(file_id).strip() for file_id in exclude_ids}
    is_excluded = labels[FILE_ID_COLUMN].isin(excluded)
    not_found = sorted(excluded - set(labels[FILE_ID_COLUMN]))
    if not_found:
        logger.warning("%s: %d excluded id(s) are not in the CSV: %s", path, len(not_found), not_found[:10])
    logger.info("%s: excluded %d row(s) by id", path, int(is_excluded.sum()))
    return labels.loc[~is_excluded].reset_index(drop=True)
