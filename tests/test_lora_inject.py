"""inject_lora matching rules, freezing, merge/unmerge over a model, counting, and every config error."""

import pytest
import torch
from lora_helpers import Tiny
from torch import nn

from lora import LoRAConfig, LoRALinear, count_parameters, inject_lora, merge_lora, unmerge_lora
from lora.inject import resolve_targets


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


def test_exclude_all_linear_keeps_only_the_head():
    """ "all-linear" as exclude_modules means what it means as a target: every Linear but the output head."""
    assert names_for(["lm_head", "q_proj"], exclude="all-linear") == ["lm_head"]


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


@pytest.mark.parametrize("training", [True, False])
def test_injected_layers_keep_the_models_mode(training):
    """Injecting into (or loading an adapter into) a model in eval mode must not switch LoRA dropout on."""
    model = Tiny().train(training)
    inject_lora(model, LoRAConfig(rank=2, dropout=0.5, target_modules="all-linear"))
    assert all(m.training == training for m in model.modules())


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
    assert error_of(lambda: merge_lora(model)) == (
        "lm_head.weight is tied to ['emb.weight']; merging would change those too. "
        "Keep this adapter unmerged (or untie the weights first)"
    )
    assert not model.lm_head.merged and not model.layers[0].self_attn.q_proj.merged
    trainable, total = count_parameters(model)  # the tied matrix counted once
    assert total == sum(p.numel() for p in Tiny().parameters()) - 11 * 8 + trainable


def test_all_linear_skips_the_head_that_get_output_embeddings_names():
    """A head not called lm_head (a transformers model's `embed_out`, say) is found through get_output_embeddings."""

    class Named(Tiny):
        def __init__(self):
            super().__init__()
            self.embed_out = self.lm_head
            del self.lm_head

        def get_output_embeddings(self) -> nn.Module:
            return self.embed_out

    names = inject_lora(Named(), LoRAConfig(rank=2, target_modules="all-linear"))
    assert len(names) == 10 and "embed_out" not in names


class HeadNamedEmbedOut(Tiny):
    """Tiny whose head is `embed_out` (found only through get_output_embeddings), with a top-level Linear too (as
    OPT-350m's project_in): a leaf name with no dot in front of it."""

    def __init__(self):
        super().__init__()
        self.embed_out = self.lm_head
        del self.lm_head
        self.project_in = nn.Linear(8, 8, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.embed_out


def test_all_linear_in_a_list_stands_for_every_linear_leaf_name_but_the_head():
    assert resolve_targets(HeadNamedEmbedOut(), ["all-linear"]) == [
        "q_proj",
        "v_proj",
        "xq_proj",
        "fc1",
        "fc2",
        "project_in",
    ]


def test_exclude_all_linear_keeps_a_head_found_through_get_output_embeddings():
    names = inject_lora(
        HeadNamedEmbedOut(), LoRAConfig(rank=2, target_modules=["embed_out", "q_proj"], exclude_modules="all-linear")
    )
    assert names == ["embed_out"]


def test_all_linear_skips_a_nested_lm_head():
    model = nn.ModuleDict({"wrapper": nn.ModuleDict({"model": Tiny()})})
    names = inject_lora(model, LoRAConfig(rank=2, target_modules="all-linear"))
    assert len(names) == 10 and "wrapper.model.lm_head" not in names


def test_merge_refuses_tied_weight_registered_after_the_linear():
    """The other owner of a tied weight is found whichever module registered it first."""

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 11, bias=False)
            self.emb = nn.Embedding(11, 8)
            self.emb.weight = self.lm_head.weight

    model = HeadFirst()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["lm_head"]))
    assert error_of(lambda: merge_lora(model)).startswith("lm_head.weight is tied to ['emb.weight']")


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
    assert error_of(lambda: merge_lora(model)) == (
        "merging 'layers.1.self_attn.q_proj': merging LoRA gives a non-finite weight (lora_A/lora_B hold inf/nan "
        "or overflow torch.float32); the weight was left unchanged"
    )
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, w0)
    assert not model.layers[0].self_attn.q_proj.merged


# ---- bad input: one test per case, each with its whole message ---------------------------------------

LINEARS = (
    "layers.*.fc1, layers.*.fc2, " + ", ".join(f"layers.*.self_attn.{p}_proj" for p in "q v xq".split()) + ", lm_head"
)


def error_of(fn, error=ValueError) -> str:
    with pytest.raises(error) as e:
        fn()
    return str(e.value)


def test_target_matching_nothing_names_targets_and_lists_linears():
    msg = error_of(lambda: names_for(["fc2"], exclude=["fc2"]))
    assert msg == (
        f"target_modules=['fc2'] (exclude_modules=['fc2']) matched no module. Linear modules in the model: {LINEARS}"
    )


def test_each_target_name_must_match_a_module():
    """One name that matches nothing is refused, even when the others match (PEFT would ignore it)."""
    msg = error_of(lambda: names_for(["q_proj", "vproj", "dense"]))
    assert msg == (
        "target_modules=['q_proj', 'vproj', 'dense']: 'vproj', 'dense' matched no module (did you mean 'v_proj' "
        f"for 'vproj'?). Linear modules in the model: {LINEARS}"
    )


def test_a_llama_name_on_an_opt_style_model_is_told_the_models_own_name():
    """Two unmatched names, each with its hint from the name table (difflib alone would say 'v_proj' for both)."""
    msg = error_of(lambda: names_for(["q_proj", "down_proj", "gate_proj"]))
    assert msg == (
        "target_modules=['q_proj', 'down_proj', 'gate_proj']: 'down_proj', 'gate_proj' matched no module (did you mean "
        f"'fc2' for 'down_proj', 'fc1' for 'gate_proj'?). Linear modules in the model: {LINEARS}"
    )


@pytest.mark.parametrize(
    "model,linears",
    [
        (nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2)), "*.*, 1"),  # indices folded after a dot
        (nn.Sequential(nn.Embedding(3, 2)), "(none)"),
    ],
)
def test_linear_summary_folds_indices(model, linears):
    msg = error_of(lambda: inject_lora(model, LoRAConfig(target_modules=["k_proj"])))
    assert msg.endswith(f"matched no module. Linear modules in the model: {linears}")


def test_match_that_is_not_linear():
    assert error_of(lambda: names_for(["self_attn"])) == (
        "target_modules=['self_attn'] matched 'layers.0.self_attn', a Attn, but LoRA wraps nn.Linear only. "
        f"Linear modules in the model: {LINEARS}"
    )


@pytest.mark.parametrize("second", [["q_proj", "v_proj"], "all-linear"])
def test_double_injection(second):
    model = Tiny()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    assert error_of(lambda: inject_lora(model, LoRAConfig(rank=2, target_modules=second))) == (
        "'layers.0.self_attn.q_proj' is already a LoRALinear: inject_lora ran twice on it. Inject once, "
        "or exclude it with exclude_modules"
    )
    assert not isinstance(model.layers[0].self_attn.v_proj, LoRALinear)  # nothing changed
    assert "layers.*.self_attn.q_proj" in error_of(lambda: names_for(["k_proj"]))  # wrapped layers are listed too


FIRST = dict(rank=2, alpha=5.0, dropout=0.1, use_rslora=True, init="gaussian", bias="lora_only")


@pytest.mark.parametrize(
    "change",
    [dict(rank=4), dict(alpha=1.0), dict(dropout=0.2), dict(use_rslora=False), dict(init="kaiming"), dict(bias="all")],
)
def test_second_injection_needs_same_hyperparameters(change):
    model = Tiny()
    first = LoRAConfig(target_modules=["q_proj"], **FIRST)
    inject_lora(model, first)
    msg = error_of(lambda: inject_lora(model, LoRAConfig(target_modules=["v_proj"], **{**FIRST, **change})))
    assert msg == (
        f"the model already carries LoRA with {first}; a second inject_lora must use the same rank, alpha, "
        "dropout, use_rslora, init, bias (one adapter config per model, as in PEFT's file format)"
    )


def test_second_injection_into_other_modules_records_all_wrapped_names():
    model = Tiny()
    inject_lora(model, LoRAConfig(target_modules=["q_proj"], **FIRST))
    assert inject_lora(model, LoRAConfig(target_modules=["fc1"], **FIRST)) == ["layers.0.fc1", "layers.1.fc1"]
    wrapped = [f"layers.{i}.{m}" for i in range(2) for m in ("fc1", "self_attn.q_proj")]
    assert model.lora_config == LoRAConfig(target_modules=wrapped, **FIRST)
    trainable_bias = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_bias == {f"{n}.bias" for n in wrapped}  # bias="lora_only" still applies to all


def test_config_must_be_lora_config():
    assert error_of(lambda: inject_lora(Tiny(), {"rank": 2}), TypeError) == "expected a LoRAConfig, got dict"


def test_merge_and_unmerge_errors():
    assert error_of(lambda: merge_lora(Tiny())) == "the model has no LoRALinear layers to merge; call inject_lora first"
    msg = error_of(lambda: unmerge_lora(Tiny()), RuntimeError)
    assert msg == "unmerge_lora needs a merged model; not merged: no LoRA layers"
    model = Tiny()
    names = inject_lora(model, LoRAConfig(rank=2, target_modules="all-linear"))
    assert merge_lora(model) == names
    assert error_of(lambda: merge_lora(model), RuntimeError) == (
        f"LoRA is already merged into {names[:3]}...; merging twice would add B A twice. Call unmerge_lora first"
    )
    for name in names[:4]:
        model.get_submodule(name).unmerge()
    msg = error_of(lambda: unmerge_lora(model), RuntimeError)
    assert msg == f"unmerge_lora needs a merged model; not merged: {names[:3]}"


def test_every_layer_gets_the_configs_dropout_and_init():
    model = Tiny()
    inject_lora(model, LoRAConfig(rank=4, dropout=0.25, init="gaussian", target_modules=["fc1", "fc2"]))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4
    assert all(isinstance(m.dropout, nn.Dropout) and m.dropout.p == 0.25 and m.init == "gaussian" for m in layers)
    a = torch.cat([m.lora_A.flatten() for m in layers])
    assert abs(a.std().item() - 1 / 4) < 0.05  # N(0, 1/r), not kaiming-uniform's bound of 1/sqrt(in)


def test_a_second_injection_records_the_wrapped_modules_and_no_exclusion():
    model = Tiny()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    inject_lora(model, LoRAConfig(rank=2, target_modules=["fc1"], exclude_modules=["layers.0.fc1"]))
    assert model.lora_config.target_modules == [
        "layers.0.self_attn.q_proj",
        "layers.1.fc1",
        "layers.1.self_attn.q_proj",
    ]
    assert model.lora_config.exclude_modules is None  # the explicit list is the whole story
