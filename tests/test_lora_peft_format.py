"""Our adapter files match what peft 0.21 writes and reads, on a tiny random transformers OPT (no download)."""

import json

import peft
import pytest
import torch
import transformers

from lora import LoRAConfig, inject_lora, load_adapter, save_adapter
from lora.inject import lora_layers


def tiny_opt() -> torch.nn.Module:
    torch.manual_seed(0)  # same base weights on every call
    cfg = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return transformers.OPTForCausalLM(cfg).eval()


def peft_config(cfg: LoRAConfig, **kw):
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
        **kw,
    )


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# max|PEFT's logits - ours| and max|either - float64 reference| (below) with the same adapter, measured on CPU (Xeon,
# AMX): 1.6e-7 and 1.5e-7 (logits ~0.3); the bound is ~3x that. The adapter moves the logits by 0.27 (3 targets) and
# 0.39 (all linear), 5e5x the bound: an adapter loaded wrongly, or not at all, cannot pass.
ATOL = 5e-7


def merged_reference(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits the adapter in `model` should give, computed independently: a float64 copy of the base OPT whose
    wrapped Linears hold W + scaling * B @ A (and the adapter's bias), run by transformers."""
    ref = tiny_opt().double()
    with torch.no_grad():
        for name, layer in lora_layers(model):
            linear = ref.get_submodule(name)
            linear.weight.copy_(layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double())
            linear.bias.copy_(layer.bias.double())
    return logits(ref, ids)


def assert_adapter_applied(model: torch.nn.Module, ours: torch.nn.Module, ids: torch.Tensor) -> None:
    """Both `model` (PEFT's or ours) and `ours` give the reference logits of base + adapter, and the adapter
    changes them by far more than the tolerance."""
    want = merged_reference(ours, ids)
    base = logits(tiny_opt(), ids).double()
    assert (want - base).abs().max().item() > 1e4 * ATOL  # a check that a no-op adapter could pass is no check
    torch.testing.assert_close(logits(model, ids).double(), want, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(ours, ids).double(), want, rtol=0, atol=ATOL)


def ours_trained(cfg: LoRAConfig):
    model = tiny_opt()
    inject_lora(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    return model


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_same_files_keys_shapes_and_config_as_peft(tmp_path, bias):
    from safetensors.torch import load_file

    cfg = LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], use_rslora=True, bias=bias)
    save_adapter(ours_trained(cfg), tmp_path / "ours")
    peft.get_peft_model(tiny_opt(), peft_config(cfg)).save_pretrained(tmp_path / "peft")

    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    c_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    c_theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in (
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "bias",
        "init_lora_weights",
        "exclude_modules",
        "fan_in_fan_out",
        "task_type",
    ):
        assert c_ours[field] == c_theirs[field], field
    assert sorted(c_ours["target_modules"]) == sorted(c_theirs["target_modules"])


def test_peft_loads_our_adapter(tmp_path):
    cfg = LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "fc1"], bias="lora_only")
    ours = ours_trained(cfg)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_opt(), tmp_path).eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=ATOL)
    assert_adapter_applied(theirs, ours, ids)


def test_we_load_peft_adapter(tmp_path):
    cfg = LoRAConfig(rank=4, alpha=8.0, target_modules="all-linear")
    theirs = peft.get_peft_model(tiny_opt(), peft_config(cfg, init_lora_weights=False)).eval()  # random B
    theirs.save_pretrained(tmp_path)
    ours = tiny_opt()
    names = load_adapter(ours, tmp_path)
    assert len(names) == 2 * 6 and "lm_head" not in names
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    assert_adapter_applied(theirs, ours, ids)
