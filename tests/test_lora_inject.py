"""inject_lora matching rules, freezing, merge/unmerge over a model, counting, and every config error."""

import pytest
import torch
from lora_helpers import Tiny
from torch import nn

from lora import LoRAConfig, LoRALinear, count_parameters, inject_lora, merge_lora, unmerge_lora


def names_for(targets, exclude=None):
    return inject_lora(Tiny(), LoRAConfig(rank=2, target_modules=targets, exclude_modules=exclude))


def test_suffix_component_matching():
    assert names_for(["q_proj"]) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]  # never xq_proj
    assert names_for(["self_attn.v_proj", "fc1"]) == [
        "layers.0.self_attn.v_proj",
        "layers.0.fc1",
        "layers.1.self_attn.v_proj",
        "layers.1.fc1",
    ]
    assert names_for(["layers.1.fc2"]) == ["layers.1.fc2"]


def test_partial_component_never_matches():
    with pytest.raises(ValueError, match="matched no module"):
        names_for(["proj"])


def test_regex_full_match():
    assert names_for(r"layers\.0\..*_proj") == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.0.self_attn.xq_proj",
    ]
    assert names_for(r".*\.fc[12]") == ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]


def test_all_linear_skips_lm_head_and_exclude():
    names = names_for("all-linear")
    assert len(names) == 10 and "lm_head" not in names
    assert names_for("all-linear", exclude=["xq_proj", "fc2"]) == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.0.fc1",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
        "layers.1.fc1",
    ]
    assert names_for(["q_proj"], exclude=r"layers\.1\..*") == ["layers.0.self_attn.q_proj"]


def test_inject_wraps_freezes_and_keeps_base_keys():
    model = Tiny()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 11, (2, 5))
    y0 = model(ids)
    names = inject_lora(model, LoRAConfig(rank=3, target_modules=["q_proj", "v_proj"]))
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(model(ids), y0, rtol=0, atol=0)  # B = 0 at init
    sd = model.state_dict()
    assert set(base_sd) <= set(sd)
    assert set(sd) - set(base_sd) == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    missing, unexpected = model.load_state_dict(base_sd, strict=False)  # a base checkpoint loads as is
    assert not unexpected and all(".lora_" in k for k in missing)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_trainable_count_is_rank_times_in_plus_out():
    model = Tiny()
    total = sum(p.numel() for p in model.parameters())
    names = inject_lora(model, LoRAConfig(rank=3, target_modules="all-linear"))
    per_layer = [3 * (m.in_features + m.out_features) for m in map(model.get_submodule, names)]
    assert count_parameters(model) == (sum(per_layer), total + sum(per_layer))


@pytest.mark.parametrize(
    "bias,expected",
    [
        ("none", set()),
        ("lora_only", {"layers.0.fc1.bias", "layers.1.fc1.bias"}),
        (
            "all",
            {
                f"layers.{i}.{m}.bias"
                for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.xq_proj", "self_attn.norm", "fc1", "fc2")
            },
        ),
    ],
)
def test_bias_modes(bias, expected):
    model = Tiny()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["fc1"], bias=bias))
    trainable_bias = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_bias == expected


def test_weight_tying_survives_injection_and_merge_refuses_tied():
    model = Tiny(tie=True)
    inject_lora(model, LoRAConfig(rank=2, target_modules=["lm_head", "q_proj"]))
    assert model.lm_head.weight is model.emb.weight
    with pytest.raises(ValueError, match="tied"):
        merge_lora(model)
    assert not model.lm_head.merged and not model.layers[0].self_attn.q_proj.merged


def test_merge_unmerge_model():
    model = Tiny().double()
    inject_lora(model, LoRAConfig(rank=2, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 11, (2, 5))
    y0 = model(ids)
    w0 = model.layers[0].fc1.weight.detach().clone()
    merge_lora(model)
    torch.testing.assert_close(model(ids), y0, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    torch.testing.assert_close(model.layers[0].fc1.weight, w0, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="needs a merged model"):
        unmerge_lora(model)


def test_merge_non_finite_rolls_back():
    model = Tiny()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    with torch.no_grad():
        model.layers[1].self_attn.q_proj.lora_B.fill_(float("nan"))
    w0 = model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(ValueError, match="layers.1.self_attn.q_proj.*non-finite"):
        merge_lora(model)
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, w0)
    assert not model.layers[0].self_attn.q_proj.merged


# ---- bad input: one test per case ------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -4])
def test_rank_not_positive(rank):
    with pytest.raises(ValueError, match="rank must be > 0"):
        LoRAConfig(rank=rank)


@pytest.mark.parametrize("rank", [2.5, "8", True])
def test_rank_not_integer(rank):
    with pytest.raises(TypeError, match="rank must be an int"):
        LoRAConfig(rank=rank)


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_alpha_not_positive(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoRAConfig(alpha=alpha)


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5])
def test_dropout_out_of_range(dropout):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoRAConfig(dropout=dropout)


@pytest.mark.parametrize("targets", [[], ""])
def test_empty_targets(targets):
    with pytest.raises(ValueError, match="empty"):
        LoRAConfig(target_modules=targets)


def test_bad_init_and_bias_mode():
    with pytest.raises(ValueError, match="init must be one of"):
        LoRAConfig(init="xavier")
    with pytest.raises(ValueError, match="bias must be one of"):
        LoRAConfig(bias="some")


def test_target_matching_nothing_names_targets_and_lists_linears():
    with pytest.raises(ValueError) as e:
        names_for(["k_proj", "o_proj"])
    msg = str(e.value)
    assert "['k_proj', 'o_proj']" in msg and "matched no module" in msg
    assert "layers.*.self_attn.q_proj" in msg and "layers.*.fc1" in msg and "lm_head" in msg


def test_match_that_is_not_linear():
    with pytest.raises(ValueError, match=r"'layers.0.self_attn', a Attn, but LoRA wraps nn.Linear only"):
        names_for(["self_attn"])


def test_double_injection():
    model = Tiny()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a LoRALinear"):
        inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    assert not isinstance(model.layers[0].self_attn.v_proj, LoRALinear)  # nothing changed


def test_second_injection_into_other_modules_needs_same_hyperparameters():
    model = Tiny()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="same rank"):
        inject_lora(model, LoRAConfig(rank=4, target_modules=["v_proj"]))
    inject_lora(model, LoRAConfig(rank=2, target_modules=["v_proj"]))
    assert len(model.lora_config.target_modules) == 4


def test_config_must_be_lora_config():
    with pytest.raises(TypeError, match="LoRAConfig"):
        inject_lora(Tiny(), {"rank": 2})
