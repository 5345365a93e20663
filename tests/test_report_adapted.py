"""The report names the modules each target-modules value adapted: the same name (`fc1`, `attention`) stands for
other modules on another architecture, so the table says what was trained, not just what was asked for."""

from __future__ import annotations

from row_helpers import a_row

from experiments.config.config import load_config
from experiments.report.markdown import adapted_note
from experiments.report.studies import load_studies
from experiments.sweep.plan import plan_runs
from experiments.sweep.results import append_row

TARGETS = "experiments/configs/abl_target_modules.yaml"


def _append(out, spec, adapted, trainable):
    append_row(
        out, a_row(spec, run_dir=f"runs/{spec.config_hash}", adapted_modules=adapted, trainable_params=trainable)
    )


def test_each_value_lists_the_modules_it_adapted_and_their_parameters(tmp_path):
    specs = plan_runs(load_config(TARGETS), name="abl_target_modules", values=[["q_proj", "v_proj"], ["fc1", "fc2"]])
    _append(tmp_path, specs[0], "layers.*.self_attn.q_proj, layers.*.self_attn.v_proj", 16384)
    _append(tmp_path, specs[1], "layers.*.mlp.down_proj, layers.*.mlp.gate_proj, layers.*.mlp.up_proj", 49152)
    (st,) = load_studies(tmp_path)
    text = "\n".join(adapted_note(st))
    assert "| fc1,fc2 | layers.*.mlp.down_proj, layers.*.mlp.gate_proj, layers.*.mlp.up_proj | 49,152 |" in text
    assert "| q_proj,v_proj | layers.*.self_attn.q_proj, layers.*.self_attn.v_proj | 16,384 |" in text


def test_rows_of_older_versions_without_the_column_add_nothing(tmp_path):
    (spec,) = plan_runs(load_config(TARGETS), name="abl_target_modules", values=[["q_proj", "v_proj"]])
    _append(tmp_path, spec, None, 16384)
    (st,) = load_studies(tmp_path)
    assert adapted_note(st) == []


def test_other_studies_have_no_module_table(tmp_path):
    spec = plan_runs(load_config("experiments/configs/abl_lora_rank.yaml"), name="abl_lora_rank", values=[4])[0]
    _append(tmp_path, spec, "layers.*.self_attn.q_proj, layers.*.self_attn.v_proj", 4096)
    (st,) = load_studies(tmp_path)
    assert adapted_note(st) == []
