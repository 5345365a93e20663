"""The lab's target names on every base: the seed's OPT names keep meaning what they meant on the built-in base and
map onto a Llama-family model's own modules; role names (attention, mlp, all-linear) resolve on both; a name that
matches nothing is refused before any work, with a did-you-mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from experiments.base.pretrain import base_gpt_config
from experiments.config.config import TARGET_NAMES, PretrainConfig
from experiments.run import main
from lora import LoRAConfig, count_parameters, inject_lora
from lora.inject import ROLE_NAMES, SEED_TARGETS, fold_names, resolve_targets
from model import GPT, GPTConfig

transformers.logging.set_verbosity_error()

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"
TM = CONFIGS / "abl_target_modules.yaml"
STUDY_VALUES = yaml.safe_load(TM.read_text())["ablation"]["values"]
LLAMA = dict(norm="rmsnorm", mlp="gated", activation="silu", bias=False, n_kv_head=2, tie_embeddings=True)
SHAPE = dict(vocab_size=50, n_layer=2, n_head=4, d_model=32, d_ff=48, max_position_embeddings=64)


def opt_style() -> GPT:
    return GPT(GPTConfig(**SHAPE))


def llama_style() -> GPT:
    return GPT(GPTConfig(**SHAPE, **LLAMA))


def wrapped(model: GPT, targets) -> list[str]:
    return inject_lora(model, LoRAConfig(rank=4, target_modules=targets))


def suffix_rule(model: GPT, targets: list[str]) -> list[str]:
    """The matching rule before target names were resolved (PEFT's): a dotted name equal to a target or ending in
    "." + target, in module order."""
    return [n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)]


def test_built_in_base_adapts_the_same_modules_for_every_study_value():
    """The default target-modules study on the built-in base: resolution changes nothing (same names, same
    order), so its results stay bit-identical."""
    with torch.device("meta"):
        cfg = base_gpt_config(PretrainConfig(), vocab_size=8192)
        for value in STUDY_VALUES:
            model = GPT(cfg)
            assert resolve_targets(model, value) == value
            assert wrapped(model, value) == suffix_rule(GPT(cfg), value)
            assert model.lora_config.target_modules == value


@pytest.mark.parametrize(
    "value,llama_leaves",
    [
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
        (["q_proj", "k_proj", "v_proj", "out_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
        (["q_proj", "v_proj", "fc1", "fc2"], ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
        (
            ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    ],
)
def test_study_values_map_onto_a_llama_model(value, llama_leaves):
    """Each value of the study on a Llama-family model: the modules it stands for, and LoRA's parameter count
    computed from their shapes (rank * (in + out) each, with GQA's narrower k/v)."""
    assert value in STUDY_VALUES
    model = llama_style()
    names = wrapped(model, value)
    assert model.lora_config.target_modules == llama_leaves
    assert names == suffix_rule(llama_style(), llama_leaves)
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32)}
    shapes |= {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    expected = sum(4 * sum(shapes[n.rsplit(".", 1)[-1]]) for n in names)
    assert count_parameters(model)[0] == expected
    assert len(names) == 2 * len(llama_leaves)


@pytest.mark.parametrize(
    "make,role,leaves",
    [
        (opt_style, "attention", ["q_proj", "k_proj", "v_proj", "out_proj"]),
        (opt_style, "mlp", ["fc1", "fc2"]),
        (opt_style, "all-linear", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
        (llama_style, "attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        (llama_style, "mlp", ["gate_proj", "up_proj", "down_proj"]),  # not the `mlp` module itself
        (llama_style, "all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)
def test_role_names_resolve_on_both_architectures(make, role, leaves):
    model = make()
    assert resolve_targets(model, [role]) == leaves
    assert len(wrapped(model, [role])) == 2 * len(leaves)


def test_roles_and_names_combine_without_repeats():
    assert resolve_targets(llama_style(), ["attention", "q_proj", "fc2", "mlp"]) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "down_proj",
        "gate_proj",
        "up_proj",
    ]


def test_one_table_of_names():
    """The lab's names and the benchmark's are lora.inject's: one definition."""
    from bench.train.steps import TARGETS_ALL

    assert TARGETS_ALL == SEED_TARGETS == ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    assert TARGET_NAMES == (*SEED_TARGETS, *ROLE_NAMES)


@pytest.mark.parametrize(
    "make,targets,message",
    [
        (opt_style, ["q_proj", "o_proj"], "'o_proj' matched no module (did you mean 'out_proj' for 'o_proj'?)"),
        (opt_style, ["gate_proj"], "'gate_proj' matched no module (did you mean 'fc1' for 'gate_proj'?)"),
        (llama_style, ["q_proj", "o_prj"], "'o_prj' matched no module (did you mean 'o_proj' for 'o_prj'?)"),
        (llama_style, ["atention"], "'atention' matched no module (did you mean 'attention' for 'atention'?)"),
        (opt_style, ["dense"], "'dense' matched no module. Linear modules in the model: layers.*.fc1, "),
    ],
)
def test_a_name_matching_nothing_is_refused_with_a_guess(make, targets, message):
    model = make()
    with pytest.raises(ValueError, match=r"Linear modules in the model: .*lm_head$") as e:
        wrapped(model, targets)
    assert message in str(e.value)
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing was touched


def test_fold_names():
    names = ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.10.mlp.up_proj", "lm_head"]
    assert fold_names(names) == ["layers.*.mlp.up_proj", "layers.*.self_attn.q_proj", "lm_head"]


# ---- the lab: a Llama folder, checked before any work ------------------------------------------------------------


@pytest.fixture
def llama_folder(tmp_path, tiny_checkpoint) -> Path:
    """A Llama folder as transformers writes it, with a byte-level BPE tokenizer.json of the same vocabulary."""
    folder = tiny_checkpoint(tmp_path / "llama")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    hf.save_pretrained(folder)
    return folder


def test_the_study_plans_on_a_llama_folder(tmp_path, llama_folder, isolated_cache, capsys):
    """Every value of the seed's target-modules study, and a role name, pass preflight on a Llama base."""
    argv = ["--config", str(TM), "--base_model", str(llama_folder), "--set", "model.max_position_embeddings=64"]
    assert main([*argv, "--dry-run", "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--target_modules", "attention,mlp", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main([*argv, "--target_modules", "q_proj,dense", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "'dense' matched no module" in err and "layers.*.self_attn.o_proj" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists() and not (isolated_cache / "base").exists()
