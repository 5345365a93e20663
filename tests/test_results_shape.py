"""A results folder of another shape (written by an older version, or edited by hand) and a report that cannot be
written: each gives one line naming what is wrong and how to get out, exit 2, or a report that says what it left
out; never a traceback, a silently dropped run, or runs at different learning rates pooled into one mean."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.figure
import nbformat
import pytest

from experiments.finetune.row import COLUMNS
from experiments.report.markdown import main as report_main
from experiments.report.recommend import recommend
from experiments.report.studies import NEEDS, load_studies
from experiments.sweep.results import RESULTS_JSONL, ResultsFileError

REPO = Path(__file__).resolve().parent.parent
LR_GRID = REPO / "docs" / "lr_grid_study" / RESULTS_JSONL
DEFAULT = REPO / "docs" / "default_study" / RESULTS_JSONL


def committed(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULTS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def without(rows: list[dict], key: str, where=lambda r: True) -> list[dict]:
    return [{k: v for k, v in r.items() if not (k == key and where(r))} for r in rows]


def report(folder: Path, capsys, *flags: str) -> tuple[int, str]:
    rc = report_main([str(folder), *flags])
    return rc, capsys.readouterr().err


def test_every_key_a_feature_needs_is_a_column_of_the_row():
    assert {k for need in NEEDS.values() for k in need.keys} <= set(COLUMNS)


def test_lr_grid_rows_without_tune_loss_are_named_not_shown_as_zero_of_zero(tmp_path, capsys):
    rows = without(committed(LR_GRID), "tune_loss", where=lambda r: r["value"] == 16)
    rc, err = report(write(tmp_path, rows), capsys, "--no-plots")
    lacking = [n for n, r in enumerate(rows, 1) if r["value"] == 16 and r["study_hash"].startswith("90b74e")]
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    named = f"{tmp_path / RESULTS_JSONL}, lines {', '.join(map(str, lacking))} lack `tune_loss` (absent or empty)"
    assert f"{named}, which an lr grid" in err
    assert "delete those lines and run the same sweep again" in err
    assert not (tmp_path / "report.md").exists()


def test_lr_grid_rows_with_an_empty_tune_loss_are_named_never_pooled(tmp_path):
    """A null tune loss on finished runs leaves no lr to choose: named, not reported over every lr at once."""
    rows = [{**r, "tune_loss": None} if r["value"] == 16 else r for r in committed(LR_GRID)]
    with pytest.raises(ResultsFileError, match=r"lines [\d, ]+ lack `tune_loss` \(absent or empty\), which an lr grid"):
        load_studies(write(tmp_path, rows))


def test_lr_grid_rows_without_lr_are_named_never_pooled_into_one_mean(tmp_path, capsys):
    rows = without(committed(LR_GRID), "lr")
    rc, err = report(write(tmp_path, rows), capsys, "--no-plots")
    first = (rows[0]["study_hash"], rows[0]["value"])  # the first value met: its six runs (3 lrs x 2 seeds)
    lines = [n for n, r in enumerate(rows, 1) if (r["study_hash"], r["value"]) == first]
    assert len(lines) == 6 and rc == 2 and err.count("\n") == 1
    named = f"lines {', '.join(map(str, lines))} lack `lr` (absent or empty)"
    assert f"{named}, which tells apart the runs of one value at one seed" in err
    assert "pooled into one mean" in err and "config.json has it" in err
    some = without(committed(LR_GRID), "lr", where=lambda r: r["value"] == 64 and r["lr"] == 0.03)
    with pytest.raises(ResultsFileError, match=r", lines 14, 36 lack `lr`"):
        load_studies(write(tmp_path / "some", some))


def test_rows_without_lr_outside_a_grid_report_as_before(tmp_path, capsys):
    """Nothing to tell apart: one run per value and seed. The tables equal those of the rows with lr."""
    assert report(write(tmp_path / "with", committed(DEFAULT)), capsys, "--no-plots")[0] == 0
    assert report(write(tmp_path / "without", without(committed(DEFAULT), "lr")), capsys, "--no-plots")[0] == 0
    tables = [
        [line for line in (tmp_path / f / "report.md").read_text().splitlines() if line.startswith("|")]
        for f in ("with", "without")
    ]
    assert tables[0] == tables[1] and len(tables[0]) > 20


def test_two_runs_of_one_value_seed_and_lr_that_no_column_tells_apart_are_named(tmp_path):
    rows = committed(DEFAULT)[:3]  # rank 4, 8, 16 at seed 0
    twin = {**rows[0], "config_hash": "f" * 16, "run_dir": "runs/" + "f" * 16}
    with pytest.raises(ResultsFileError, match=r"lines 1, 4 lack `lr`"):
        load_studies(write(tmp_path / "a", without([*rows, twin], "lr")))
    with pytest.raises(
        ResultsFileError,
        match=r"lines 1, 4 are runs of lora_rank value 4 at one seed and lr 0.01 with different config hashes",
    ):
        load_studies(write(tmp_path / "b", [*rows, twin]))


def test_a_finished_row_without_val_ppl_is_named_not_left_out_of_the_mean(tmp_path):
    rows = without(committed(DEFAULT), "val_ppl", where=lambda r: r["value"] == 8 and r["seed"] == 1)
    with pytest.raises(
        ResultsFileError, match=r"results.jsonl, line \d+ lacks `val_ppl` \(absent or empty\), which the table's mean"
    ):
        load_studies(write(tmp_path, rows))
    failed = [{**r, "status": "failed"} if r["value"] == 8 and r["seed"] == 1 else r for r in rows]
    (st, *_) = load_studies(write(tmp_path / "failed", failed))  # a run that did not finish has no val_ppl: fine
    assert [len(v.ok) for v in st.values if v.value == 8] == [2]


def test_rows_without_a_cost_say_so_in_the_recommendation(tmp_path):
    rows = without(committed(DEFAULT), "train_time_s", where=lambda r: r["value"] == 64)
    (st, *_) = load_studies(write(tmp_path, rows))
    evidence = recommend(st).evidence
    assert "; train time unknown for rank 64 (rows without `train_time_s`), ranked as the most costly" in evidence
    # two values without one cost, and a second cost missing: each cost its own clause, the values listed
    two = without(rows, "train_time_s", where=lambda r: r["value"] == 32)
    two = without(two, "peak_memory_bytes", where=lambda r: r["value"] == 64)
    (st2, *_) = load_studies(write(tmp_path / "two", two))
    assert recommend(st2).evidence.endswith(
        "; train time unknown for rank 32, rank 64 (rows without `train_time_s`), ranked as the most costly"
        "; peak memory unknown for rank 64 (rows without `peak_memory_bytes`), ranked as the most costly"
    )
    (full, *_) = load_studies(write(tmp_path / "full", committed(DEFAULT)))
    assert "unknown" not in recommend(full).evidence
    # a cost no value has ranks nobody: nothing to say (the costs compared are the ones some value has)
    (none, *_) = load_studies(write(tmp_path / "none", without(committed(DEFAULT), "train_time_s", where=bool)))
    assert "unknown" not in recommend(none).evidence


def test_a_grid_value_whose_every_run_failed_shows_its_runs_as_failed(tmp_path):
    rows = [
        {**r, "status": "failed", "tune_loss": None, "val_ppl": None} if r["value"] == 16 else r
        for r in committed(LR_GRID)
    ]
    studies = load_studies(write(tmp_path, rows))
    value = next(v for v in studies[0].values if v.value == 16)
    assert value.chosen_lr is None and len(value.rows) == 6 and not value.ok  # "0/6, failed 6/6", not "0/0"


def test_a_plots_folder_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    folder = write(tmp_path, committed(DEFAULT)[:6])
    (folder / "plots").write_text("not a folder")
    rc, err = report(folder, capsys)
    why = "is a file where the report writes a folder; move it away."
    assert rc == 2 and err == f"error: cannot write the report: {folder / 'plots'} {why}\n"


def test_a_plot_that_cannot_be_replaced_is_one_line_and_exit_2(tmp_path, capsys):
    folder = write(tmp_path, committed(DEFAULT)[:6])
    (folder / "plots" / "lora_rank.png").mkdir(parents=True)  # what the first plot would replace
    rc, err = report(folder, capsys)
    assert rc == 2 and err.startswith(
        f"error: cannot write the report: {folder / 'plots' / 'lora_rank.png'} is a folder"
    )
    assert err.count("\n") == 1


def test_a_plots_folder_without_write_permission_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """chmod a-w plots: root ignores permission bits, so the refusal the kernel would give is raised where the
    report saves a figure."""
    folder = write(tmp_path, committed(DEFAULT)[:6])

    def refuse(self, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refuse)
    rc, err = report(folder, capsys)
    assert rc == 2 and err == (
        f"error: cannot write the report: {folder / 'plots' / 'lora_rank.png'}: Permission denied. Make {folder} "
        "and its plots/ (and the files in them) writable, or pass --no-plots to write report.md alone.\n"
    )
    assert report(folder, capsys, "--no-plots")[0] == 0


def test_the_notebook_names_the_environment_variable_that_set_a_missing_folder(monkeypatch):
    nb = nbformat.read(REPO / "notebooks" / "ablation_analysis.ipynb", as_version=4)
    first, second = [c.source for c in nb.cells if c.cell_type == "code"][:2]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SLM_LORA_RESULTS", "/nonexistent")
    with pytest.raises(
        FileNotFoundError, match=r"/nonexistent/results.jsonl does not exist: set SLM_LORA_RESULTS \(an"
    ):
        exec(first + "\n" + second, {})
    monkeypatch.delenv("SLM_LORA_RESULTS")
    with pytest.raises(FileNotFoundError, match=r"does not exist: set RESULTS to a folder"):
        exec(first.replace('"docs/default_study"', '"/nonexistent"') + "\n" + second, {})
    assert os.environ.get("SLM_LORA_RESULTS") is None
