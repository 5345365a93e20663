"""The analysis notebook (notebooks/ablation_analysis.ipynb): the committed copy carries its outputs for
docs/default_study, and it runs top to bottom, headless (nbclient), on a folder a fresh `--quick` sweep wrote: tiny
stdlib corpora and a private SLM_LORA_CACHE, as in test_run_e2e.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "ablation_analysis.ipynb"


def outputs(nb, source: str) -> list[dict]:
    """The outputs of the one code cell whose source contains `source`."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and source in c.source]
    return cell.outputs


def pngs(outs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outs)


def text(outs: list[dict]) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/html", "")) for o in outs)


def test_committed_notebook_is_executed_in_order_with_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 'os.environ.get("SLM_LORA_RESULTS", "docs/default_study")' in code[0].source
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert text(outputs(nb, "summary_rows(st")).count("<table") == 3  # the three studies of the default study
    assert pngs(outputs(nb, "plot_study(")) == 3
    assert str(REPO) not in nbformat.writes(nb)  # no path of the machine that executed it


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, stdlib_workspace) -> Path:
    """A --quick rank sweep at the smallest settings: 2 values x 2 seeds (paired differences), a 4-step base."""
    root = tmp_path_factory.mktemp("nb")
    env = stdlib_workspace(root)
    out = root / "out"
    args = ["--quick", "--no-progress", "--out", str(out), "--data", str(root / "finetune"), "--seeds", "2"]
    args += ["--config", str(REPO / "experiments/configs/abl_lora_rank.yaml")]
    for setting in (
        "ablation.values=[2, 4]",
        "ablation.baseline=2",
        f"pretrain.corpus={root / 'pretrain'}",
        "pretrain.tokens=16384",
        "train.tokens=4096",
        "eval.max_tokens=1024",
        "data.val_fraction=0.25",
    ):
        args += ["--set", setting]
    done = subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], env=env, cwd=REPO, text=True, capture_output=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_notebook_runs_headless_on_a_quick_sweep(quick_results, monkeypatch):
    monkeypatch.setenv("SLM_LORA_RESULTS", str(quick_results))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Run from notebooks/, as `jupyter lab notebooks/...` does; any cell that raises fails the test here.
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    assert f"{quick_results}: studies: 1, runs: 4" in text(outputs(nb, "load_studies("))
    table = text(outputs(nb, "summary_rows(st"))
    assert table.count("<table") == 1
    assert all(col in table for col in ("val_ppl_ci", "delta_val_ppl", "paired", "recommended", "trainable_params"))
    assert "rank 2" in outputs(nb, "answers(")[0]["data"]["text/markdown"]
    assert pngs(outputs(nb, "plot_study(")) == 1
    assert pngs(outputs(nb, "plot_tradeoff(")) == 2  # the study's, and every study's ppl against parameters
    forgetting = outputs(nb, "plot_forgetting(")
    assert pngs(forgetting) == 1 or "lora_rank: no forgetting plot: " in text(forgetting)
    assert pngs(outputs(nb, "plot_curves(")) == 1  # the runs' metrics.jsonl are there: no "no loss curves" note
    assert "no loss curves" not in text(outputs(nb, "plot_curves("))
