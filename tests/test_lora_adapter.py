"""Adapters on disk: exact round trip, config fields, file keys, and every load error."""

import json

import pytest
import torch
from lora_helpers import Tiny
from safetensors.torch import load_file
from torch import nn

from lora import LoRAConfig, inject_lora, load_adapter, lora_state_dict, save_adapter


def trained(cfg: LoRAConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    """A Tiny with LoRA injected and random (non-zero) adapter weights, plus its base state dict."""
    torch.manual_seed(seed)
    model = Tiny()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    return model, base_sd


def fresh(base_sd: dict) -> nn.Module:
    model = Tiny()
    model.load_state_dict(base_sd)
    return model


CFG = LoRAConfig(rank=3, alpha=6.0, dropout=0.1, target_modules=["q_proj", "fc1"], use_rslora=True, init="gaussian")


def test_save_load_reproduces_outputs_exactly(tmp_path):
    model, base_sd = trained(CFG)
    save_adapter(model, tmp_path)
    other = fresh(base_sd)
    names = load_adapter(other, tmp_path)
    assert names == ["layers.0.self_attn.q_proj", "layers.0.fc1", "layers.1.self_attn.q_proj", "layers.1.fc1"]
    model.eval(), other.eval()
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(ids), other(ids))
    assert other.lora_config == CFG


def test_config_json_fields(tmp_path):
    model, _ = trained(CFG)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (3, 6.0, 0.1)
    assert cfg["target_modules"] == ["q_proj", "fc1"] and cfg["use_rslora"] is True
    assert cfg["bias"] == "none" and cfg["init_lora_weights"] == "gaussian" and cfg["exclude_modules"] is None


def test_file_keys_follow_peft(tmp_path):
    model, _ = trained(LoRAConfig(rank=2, target_modules=["q_proj"], bias="lora_only"))
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.layers.{i}.self_attn.q_proj.{leaf}"
        for i in range(2)
        for leaf in ("lora_A.weight", "lora_B.weight", "base_layer.bias")
    }
    assert set(lora_state_dict(model)) == {
        f"layers.{i}.self_attn.q_proj.{leaf}" for i in range(2) for leaf in ("lora_A", "lora_B", "bias")
    }


def test_bias_all_round_trip(tmp_path):
    model, base_sd = trained(LoRAConfig(rank=2, target_modules=["v_proj"], bias="all"))
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.v_proj.base_layer.bias" in keys
    assert "base_model.model.layers.0.fc2.bias" in keys
    other = fresh(base_sd)
    load_adapter(other, tmp_path)
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(ids), other(ids))


def test_lora_state_dict_loads_with_load_state_dict():
    model, base_sd = trained(CFG)
    other = fresh(base_sd)
    inject_lora(other, CFG)
    result = other.load_state_dict(lora_state_dict(model), strict=False)
    assert not result.unexpected_keys
    model.eval(), other.eval()
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(ids), other(ids))


def test_load_into_already_injected_model(tmp_path):
    model, base_sd = trained(CFG)
    save_adapter(model, tmp_path)
    other = fresh(base_sd)
    inject_lora(other, CFG)
    load_adapter(other, tmp_path)
    model.eval(), other.eval()
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(ids), other(ids))


# ---- bad input ------------------------------------------------------------------------------------


def test_folder_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json.*adapter_model.safetensors"):
        load_adapter(Tiny(), tmp_path)
    model, _ = trained(CFG)
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing \\['adapter_model.safetensors'\\]"):
        load_adapter(Tiny(), tmp_path)


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    model, _ = trained(CFG)
    save_adapter(model, tmp_path)
    bigger = Tiny()
    bigger.layers[0].fc1 = nn.Linear(8, 32)
    with pytest.raises(
        ValueError,
        match=r"'layers.0.fc1.lora_B' has shape \(16, 3\) but module 'layers.0.fc1' "
        r"needs \(32, 3\)",
    ):
        load_adapter(bigger, tmp_path)
    assert not any("lora" in n for n, _ in bigger.named_parameters())  # checked before injecting


def test_targets_that_do_not_fit(tmp_path):
    model, _ = trained(CFG)
    save_adapter(model, tmp_path)

    class NoQ(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    with pytest.raises(ValueError, match="has no tensor for 'fc1.lora_A'"):
        load_adapter(NoQ(), tmp_path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj = nn.Linear(8, 8)

    with pytest.raises(ValueError, match=r"matched no module. Linear modules in the model: k_proj"):
        load_adapter(Other(), tmp_path)


def test_truncated_safetensors(tmp_path):
    model, _ = trained(CFG)
    save_adapter(model, tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(Tiny(), tmp_path)


def test_corrupt_safetensors(tmp_path):
    model, _ = trained(CFG)
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x80\x04not a safetensors file" * 10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(Tiny(), tmp_path)


def test_bad_config_json(tmp_path):
    model, _ = trained(CFG)
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}'
    )
    with pytest.raises(ValueError, match="rank must be > 0"):
        load_adapter(Tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(Tiny(), tmp_path)


def test_save_without_lora(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_adapter(Tiny(), tmp_path)


def test_hf_module_prefix_in_file_keys(tmp_path):
    """An imported model names its modules as transformers does in the file (lm_head stays top-level)."""
    cfg = LoRAConfig(rank=2, target_modules=["q_proj", "lm_head"])
    model, base_sd = trained(cfg)
    model.hf_module_prefix = "model.decoder."
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    other = fresh(base_sd)
    other.hf_module_prefix = "model.decoder."
    load_adapter(other, tmp_path)
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(ids), other(ids))
