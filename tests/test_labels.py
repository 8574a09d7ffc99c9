"""Label CSV reading: coding rules and the error messages users see for bad files."""
from __future__ import annotations

import logging
import math

import pandas as pd
import pytest

from csi_dist.data.labels import LINE_COLUMN, LabelError, read_label_csv
from csi_dist.core.domain import AHF_COLUMN, CSI_COLUMN, FILE_ID_COLUMN, PATIENT_COLUMN, UNKNOWN_CLASS, ZONE_NAMES
from data_helpers import HEADER, label_row, write_csv


def write_csv_encoded(path, rows, encoding, header=HEADER):
    """`write_csv`, then the same text re-saved in `encoding` (what Excel on Windows writes is cp1252)."""
    text = write_csv(path, rows, header=header).read_text(encoding="utf-8")
    path.write_bytes(text.encode(encoding))
    return path


def test_reads_users_format_with_codings(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [
        label_row("28694662", (0, 1, 2, 3, None, 0), "1.2", "P1", "1"),
        label_row("28694663", ("2.0", "", "nan", 1, 1, 1), "", "P1", ""),
        label_row("28694664", (None,) * 6, "", "", "0.0"),
    ], header=[*HEADER, PATIENT_COLUMN, AHF_COLUMN])

    labels = read_label_csv(csv_path)

    assert labels[FILE_ID_COLUMN].tolist() == ["28694662", "28694663", "28694664"]
    assert labels.loc[0, list(ZONE_NAMES)].tolist() == [0, 1, 2, 3, UNKNOWN_CLASS, 0]
    assert labels.loc[1, list(ZONE_NAMES)].tolist() == [2, UNKNOWN_CLASS, UNKNOWN_CLASS, 1, 1, 1]
    assert labels.loc[0, CSI_COLUMN] == pytest.approx(1.2)
    assert labels.loc[1, CSI_COLUMN] == pytest.approx(5 / 4)  # empty csi: mean of the graded zones
    assert math.isnan(labels.loc[2, CSI_COLUMN])  # nothing graded
    assert labels[PATIENT_COLUMN].tolist()[:2] == ["P1", "P1"] and pd.isna(labels.loc[2, PATIENT_COLUMN])
    assert labels.loc[0, AHF_COLUMN] == 1.0 and math.isnan(labels.loc[1, AHF_COLUMN])
    assert labels[LINE_COLUMN].tolist() == [2, 3, 4]


def test_excluded_ids_are_dropped(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1"), label_row("2"), label_row("3")])
    labels = read_label_csv(csv_path, exclude_ids={"2", "99"})
    assert labels[FILE_ID_COLUMN].tolist() == ["1", "3"]


def test_missing_column_names_file_missing_and_found_columns(tmp_path):
    header = [name for name in HEADER if name != "left_mid"]
    csv_path = write_csv(tmp_path / "labels.csv", [["1", 0, 0, 0, 0, 0, 0.0]], header=header)
    with pytest.raises(LabelError) as error:
        read_label_csv(csv_path)
    message = str(error.value)
    assert str(csv_path) in message and "left_mid" in message and "right_sup" in message


def test_comma_separated_header_suggests_separator(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1")], separator=",")
    with pytest.raises(LabelError, match="comma|','"):
        read_label_csv(csv_path)


def test_duplicate_file_id_names_both_lines(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("7"), label_row("8"), label_row(" 7 ")])
    with pytest.raises(LabelError, match=r"duplicate.*'7'.*lines 2 and 4"):
        read_label_csv(csv_path)


@pytest.mark.parametrize("bad_value", ["5", "-1", "2.5", "abc"])
def test_bad_zone_value_names_file_line_column_value(tmp_path, bad_value):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1"), label_row("2", (0, 0, 0, bad_value, 0, 0))])
    with pytest.raises(LabelError) as error:
        read_label_csv(csv_path)
    message = str(error.value)
    assert str(csv_path) in message and "line 3" in message and "left_mid" in message
    assert repr(bad_value) in message and "expected" in message


@pytest.mark.parametrize("bad_value", ["2", "yes", "0.5"])
def test_bad_ahf_value_is_an_error(tmp_path, bad_value):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1", (0,) * 6, "0", bad_value)],
                         header=[*HEADER, AHF_COLUMN])
    with pytest.raises(LabelError, match=rf"line 2, column ahf: ahf '{bad_value}'"):
        read_label_csv(csv_path)


def test_bad_csi_value_is_an_error(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1", (0,) * 6, "high")])
    with pytest.raises(LabelError, match="line 2, column csi"):
        read_label_csv(csv_path)


def test_file_ids_and_patient_ids_are_read_exactly_as_written(tmp_path):
    file_ids = ["20200101.00", "20200101", "00123", "7.0", "1e5"]
    csv_path = write_csv(tmp_path / "labels.csv", [label_row(file_id, (0,) * 6, "0", "007") for file_id in file_ids],
                         header=[*HEADER, PATIENT_COLUMN])
    labels = read_label_csv(csv_path, exclude_ids={"7"})
    assert labels[FILE_ID_COLUMN].tolist() == file_ids  # "7" excludes only an id written "7"
    assert labels[PATIENT_COLUMN].tolist() == ["007"] * len(file_ids)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_utf8_with_or_without_bom_is_read_silently(tmp_path, caplog, encoding):
    csv_path = write_csv_encoded(tmp_path / "labels.csv", [label_row("µ1", (0,) * 6, "0", "Hélène")], encoding,
                                 header=[*HEADER, PATIENT_COLUMN])
    with caplog.at_level(logging.WARNING):
        labels = read_label_csv(csv_path)
    assert labels[FILE_ID_COLUMN].tolist() == ["µ1"] and labels[PATIENT_COLUMN].tolist() == ["Hélène"]
    assert caplog.text == ""


def test_cp1252_csv_is_read_with_a_warning_naming_file_and_encoding(tmp_path, caplog):
    csv_path = write_csv_encoded(tmp_path / "labels.csv", [label_row("1", (0,) * 6, "0", "P1"),
                                                           label_row("µ2", (0,) * 6, "0", "Hélène")], "cp1252",
                                 header=[*HEADER, PATIENT_COLUMN])
    with caplog.at_level(logging.WARNING):
        labels = read_label_csv(csv_path)
    assert labels[FILE_ID_COLUMN].tolist() == ["1", "µ2"] and labels[PATIENT_COLUMN].tolist() == ["P1", "Hélène"]
    assert str(csv_path) in caplog.text and "cp1252" in caplog.text and "line 3" in caplog.text


def test_forced_encoding_is_used_without_guessing(tmp_path, caplog):
    csv_path = write_csv_encoded(tmp_path / "labels.csv", [label_row("µ1")], "cp1252")
    with caplog.at_level(logging.WARNING):
        assert read_label_csv(csv_path, encoding="cp1252")[FILE_ID_COLUMN].tolist() == ["µ1"]
    assert caplog.text == ""
    # Every byte is valid latin-1, so forcing it gives that reading (cp1252's µ is latin-1's µ too; € is not).
    euro_path = write_csv_encoded(tmp_path / "euro.csv", [label_row("€1")], "cp1252")
    assert read_label_csv(euro_path, encoding="latin-1")[FILE_ID_COLUMN].tolist() == ["\x801"]


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_forced_encoding_that_cannot_decode_names_file_encoding_and_line(tmp_path, encoding):
    csv_path = write_csv_encoded(tmp_path / "labels.csv", [label_row("1"), label_row("µ2")], "cp1252")
    with pytest.raises(LabelError) as error:
        read_label_csv(csv_path, encoding=encoding)
    message = str(error.value)
    assert str(csv_path) in message and repr(encoding) in message and "line 3" in message


def test_unknown_encoding_name_is_a_label_error(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1")])
    with pytest.raises(LabelError, match="unknown encoding 'klingon'"):
        read_label_csv(csv_path, encoding="klingon")


def test_file_neither_utf8_nor_cp1252_is_a_label_error(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1")])
    csv_path.write_bytes(csv_path.read_bytes() + b"\x81\x9d;0;0;0;0;0;0;0\n")  # bytes cp1252 leaves undefined
    with pytest.raises(LabelError) as error:
        read_label_csv(csv_path)
    message = str(error.value)
    assert str(csv_path) in message and "cp1252" in message and "line 3" in message


def test_every_bad_row_is_named_in_one_error(tmp_path):
    """A user used to fix one row per run (the first only); now one run names every bad row."""
    csv_path = write_csv(tmp_path / "labels.csv", [
        label_row("1"), label_row("2", (0, 7, 0, 0, 0, 0)), label_row("3"), label_row("4", csi="high"),
        label_row("1"), label_row("6")])
    with pytest.raises(LabelError) as error:
        read_label_csv(csv_path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{csv_path}: 3 bad rows, fix them all and run again:"
    assert [line.strip().split(":")[0] for line in lines[1:]] == [
        "line 3, column left_sup", "line 5, column csi",
        "duplicate FileID '1' on lines 2 and 6; expected one row per image"]


def test_bad_rows_past_the_limit_are_counted(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row(str(row), (9, 0, 0, 0, 0, 0)) for row in range(25)])
    with pytest.raises(LabelError) as error:
        read_label_csv(csv_path)
    lines = str(error.value).splitlines()
    assert lines[0].endswith("25 bad rows, fix them all and run again:") and len(lines) == 1 + 20 + 1
    assert lines[-2].strip().startswith("line 21, column right_sup") and lines[-1] == "  ... and 5 more"
