"""The README's table of the results file's columns, made from the typed row (experiments.finetune.row.Row), so the
documentation cannot drift from what is written: `python -m experiments.report.columns` prints it, and
tests/test_row.py checks that README.md holds exactly this table between its two markers."""

from __future__ import annotations

from experiments.finetune.row import SCHEMA
from experiments.report.fmt import md_table

BEGIN = "<!-- columns: generated from experiments/finetune/row.py by python -m experiments.report.columns -->"
END = "<!-- /columns -->"


def column_table() -> str:
    """column | unit | meaning (and when it is empty), one line per column in file order."""
    rows = [
        [f"`{name}`", col.unit or None, col.meaning + (f"; {col.empty}" if col.empty else "")]
        for name, (_, col) in SCHEMA.items()
    ]
    return md_table(["column", "unit", "meaning"], rows)


if __name__ == "__main__":
    print("\n".join((BEGIN, column_table(), END)))
