"""The typed result row (experiments.finetune.row.Row): the one definition the writer, the reader, the CSV and the
README's column table all come from, and the reader's and writer's refusals of what is not a row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from row_helpers import a_row

from experiments.finetune.row import COLUMNS, RESULT_KEYS, ROW_IDENTITY, SCHEMA, row_problems
from experiments.report.columns import BEGIN, END, column_table
from experiments.sweep.results import RESULTS_CSV, RESULTS_JSONL, ResultsFileError, append_row, numbered_rows, read_rows

REPO = Path(__file__).resolve().parent.parent
COMMITTED = [REPO / "docs" / "default_study", REPO / "docs" / "lr_grid_study"]


def test_readme_column_table_is_the_one_generated_from_the_row():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, "README.md lost its column-table markers"
    between = readme.split(BEGIN)[1].split(END)[0].strip()
    assert between == column_table(), "README.md's column table is stale: run python -m experiments.report.columns"


def test_every_column_says_its_unit_and_meaning_and_the_table_names_each_once():
    assert all(col.meaning for _, col in SCHEMA.values())
    names = [line.split(" | ")[0].strip("| `") for line in column_table().splitlines()[2:]]
    assert names == list(COLUMNS) and len(set(names)) == len(names)


def test_make_row_writes_every_column_in_order_with_the_type_the_row_says():
    row = a_row()
    assert tuple(row) == COLUMNS
    assert row_problems(row) == []
    assert row["peak_memory_bytes"] == 3 << 28 and row["value"] == 4 and row["lr"] == 0.01
    assert set(RESULT_KEYS) < set(COLUMNS) and set(ROW_IDENTITY) < set(COLUMNS)
    assert ROW_IDENTITY == ("ablation", "key", "value", "seed", "status", "config_hash", "study_hash")


def test_the_committed_results_files_are_rows_in_column_order(tmp_path):
    """They may predate a column added since (old rows must load), never hold one the row does not know."""
    for folder in COMMITTED:
        rows = read_rows(folder)
        assert rows and all(row_problems(r) == [] and tuple(r) == in_order(r) for r in rows), folder
        with open(folder / RESULTS_CSV, newline="", encoding="utf-8") as f:
            header = tuple(next(csv.reader(f)))
        assert header == in_order(header) and len(header) >= 51


def in_order(names) -> tuple[str, ...]:
    """`names` in column order; a name the row does not know is dropped, so the comparison fails."""
    return tuple(c for c in COLUMNS if c in names)


def test_append_row_refuses_a_row_without_its_identity_and_writes_nothing(tmp_path):
    row = a_row()
    del row["seed"], row["study_hash"]
    with pytest.raises(
        ValueError, match=r"^not a result row, not appended to results.jsonl: it lacks seed, study_hash"
    ):
        append_row(tmp_path, row)
    assert not (tmp_path / RESULTS_JSONL).exists()
    append_row(tmp_path, a_row())
    before = (tmp_path / RESULTS_JSONL).read_bytes()
    with pytest.raises(ValueError, match="lacks ablation"):
        append_row(tmp_path, {k: v for k, v in a_row().items() if k != "ablation"})
    assert (tmp_path / RESULTS_JSONL).read_bytes() == before and len(read_rows(tmp_path)) == 1


def test_append_row_refuses_a_cell_of_the_wrong_type(tmp_path):
    with pytest.raises(ValueError, match='val_ppl is "12.2", not a number or null'):
        append_row(tmp_path, a_row(val_ppl="12.2"))
    with pytest.raises(ValueError, match="seed is true, not an integer"):
        append_row(tmp_path, a_row(seed=True))  # JSON's true is not a seed, though Python's bool is an int
    assert not (tmp_path / RESULTS_JSONL).exists()


def test_read_rows_names_the_file_the_line_and_the_bad_cell(tmp_path):
    good = json.dumps(a_row())
    (tmp_path / RESULTS_JSONL).write_text(good + "\n" + json.dumps(a_row(steps=2.5)) + "\n", encoding="utf-8")
    with pytest.raises(ResultsFileError, match=r"results.jsonl, line 2 is not a result row \(it steps is 2.5, not an"):
        read_rows(tmp_path)
    (tmp_path / RESULTS_JSONL).write_text(good + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ResultsFileError, match=r"line 2 is not a result row \(it is \[1, 2\], not a JSON object\)"):
        read_rows(tmp_path)


def test_rows_of_older_versions_and_unknown_columns_still_load(tmp_path):
    old = {k: v for k, v in a_row().items() if k in ROW_IDENTITY or k == "val_ppl"}  # written before most columns
    newer = {**a_row(), "a_column_from_a_later_version": [1, {"x": 2}]}
    (tmp_path / RESULTS_JSONL).write_text(f"{json.dumps(old)}\n\n{json.dumps(newer)}\n", encoding="utf-8")
    assert [n for n, _ in numbered_rows(tmp_path)] == [1, 3]  # line numbers as an editor shows them
    append_row(tmp_path, a_row())
    assert [len(r) for r in read_rows(tmp_path)] == [len(old), len(COLUMNS) + 1, len(COLUMNS)]


def test_a_float_column_takes_a_json_integer_and_an_integer_column_no_fraction():
    assert row_problems(a_row(lr=1)) == []  # lr: 1 is a learning rate
    assert row_problems(a_row(lora_rank=2.5)) == ["lora_rank is 2.5, not an integer"]
    assert row_problems(a_row(value_index=None, reused_from="x")) == []
