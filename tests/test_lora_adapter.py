"""Adapters on disk: exact round trip, config fields, file keys, and every load error."""

import json

import pytest
import torch
from lora_helpers import Tiny
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lora import LoRAConfig, inject_lora, load_adapter, lora_state_dict, merge_lora, save_adapter


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


CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
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


def test_save_load_on_device(tmp_path, device):
    """Save from a model on `device`, load into one there; both in eval mode (loading must not switch dropout on)."""
    model, base_sd = trained(CFG)
    model.to(device).eval()
    save_adapter(model, tmp_path)
    other = fresh(base_sd).to(device).eval()
    load_adapter(other, tmp_path)
    ids = torch.randint(0, 11, (2, 7), device=device)
    assert torch.equal(model(ids), other(ids))


def test_config_json_fields(tmp_path):
    model, _ = trained(CFG)
    save_adapter(model, tmp_path / "new" / "folder")  # parents are made
    save_adapter(model, tmp_path / "new" / "folder")  # and an existing folder is overwritten
    cfg = json.loads((tmp_path / "new" / "folder" / "adapter_config.json").read_text())
    assert cfg == {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": 3,
        "lora_alpha": 6.0,
        "lora_dropout": 0.1,
        "use_rslora": True,
        "target_modules": ["q_proj", "fc1"],
        "exclude_modules": None,
        "bias": "none",
        "init_lora_weights": "gaussian",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    with safe_open(tmp_path / "new" / "folder" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it


def test_minimal_peft_config_takes_peft_defaults(tmp_path):
    """A hand-written or older PEFT config may hold only the required keys; the rest default as in PEFT."""
    model, base_sd = trained(LoRAConfig(rank=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    minimal = {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(minimal))
    other = fresh(base_sd)
    load_adapter(other, tmp_path)
    assert other.lora_config == LoRAConfig(rank=2, alpha=16.0, target_modules=["q_proj"])


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


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_round_trip(tmp_path, bias):
    model, base_sd = trained(LoRAConfig(rank=2, target_modules=["v_proj"], bias=bias))
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.v_proj.base_layer.bias" in keys
    assert ("base_model.model.layers.0.fc2.bias" in keys) == (bias == "all")
    other = fresh(base_sd)
    load_adapter(other, tmp_path)
    assert other.lora_config.bias == bias
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(ids), other(ids))


def test_lora_state_dict_loads_with_load_state_dict():
    model, base_sd = trained(CFG)
    other = fresh(base_sd)
    inject_lora(other, CFG)
    sd = lora_state_dict(model)
    assert not any(t.requires_grad for t in sd.values())  # detached: saving or loading it records no autograd history
    result = other.load_state_dict(sd, strict=False)
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


# ---- bad input: each error with its whole message, raised before the model is touched -----------------


def error_of(fn, error=ValueError) -> str:
    with pytest.raises(error) as e:
        fn()
    return str(e.value)


def saved(tmp_path, cfg: LoRAConfig = CFG):
    model, base_sd = trained(cfg)
    save_adapter(model, tmp_path)
    return model, base_sd


def test_folder_without_files(tmp_path):
    want = "{} is not an adapter folder: missing {} (save_adapter writes {} and {})"
    msg = error_of(lambda: load_adapter(Tiny(), tmp_path), FileNotFoundError)
    assert msg == want.format(tmp_path, [CONFIG, WEIGHTS], CONFIG, WEIGHTS)
    saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    msg = error_of(lambda: load_adapter(Tiny(), tmp_path), FileNotFoundError)
    assert msg == want.format(tmp_path, [WEIGHTS], CONFIG, WEIGHTS)


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    saved(tmp_path)
    bigger = Tiny()
    bigger.layers[0].fc1 = nn.Linear(8, 32)
    assert error_of(lambda: load_adapter(bigger, tmp_path)) == (
        "adapter tensor 'layers.0.fc1.lora_B' has shape (16, 3) but module 'layers.0.fc1' needs (32, 3); "
        "the adapter was trained on a model of another size"
    )
    assert not any("lora" in n for n, _ in bigger.named_parameters())  # checked before injecting


def test_targets_that_do_not_fit(tmp_path):
    saved(tmp_path)

    class Flat(nn.Module):  # the adapter's module names, at other paths
        def __init__(self):
            super().__init__()
            self.fc1, self.q_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    assert error_of(lambda: load_adapter(Flat(), tmp_path)) == (
        f"{tmp_path / 'adapter_model.safetensors'} has no tensor for 'fc1.lora_A'; the adapter was trained on "
        "other modules than this model's targets"
    )

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj = nn.Linear(8, 8)

    msg = error_of(lambda: load_adapter(Other(), tmp_path))
    assert msg.endswith("matched no module (did you mean 'k_proj' for 'q_proj'?). Linear modules in the model: k_proj")


def test_tensors_for_modules_not_targeted(tmp_path):
    everywhere, _ = saved(tmp_path, LoRAConfig(rank=2, target_modules="all-linear"))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    extra = sorted(k for k in lora_state_dict(everywhere) if "q_proj" not in k)  # 16 of them, the message shows 5
    model = Tiny()
    assert error_of(lambda: load_adapter(model, tmp_path)) == (
        f"{tmp_path / 'adapter_model.safetensors'} holds tensors for modules this model does not target: {extra[:5]}"
    )
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("cut", [100, 0])
def test_unreadable_safetensors(tmp_path, cut):
    saved(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-cut] if cut else b"\x80\x04not a safetensors file" * 10)
    msg = error_of(lambda: load_adapter(Tiny(), tmp_path))
    assert msg.startswith(f"{f} cannot be read as safetensors (truncated or corrupt?): ")


BAD_CONFIGS = [
    ('{"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}', "rank must be > 0, got 0"),
    ("[1, 2]", "{file} is not a LoRA adapter config (peft_type must be 'LORA')"),
    ('{"peft_type": "PREFIX_TUNING"}', "{file} is not a LoRA adapter config (peft_type must be 'LORA')"),
    ('{"peft_type": "LORA", "r": null, "lora_alpha": 8}', "{file} lacks ['r', 'target_modules']"),
    (
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj"], "fan_in_fan_out": true}',
        "{file} has fan_in_fan_out=true (Conv1D layout); only nn.Linear adapters load here",
    ),
    (
        "{not json",
        "{file} is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    (b"\xff\xfe{}", "{file} is not valid JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
]


@pytest.mark.parametrize("text,message", BAD_CONFIGS)
def test_bad_config_json(tmp_path, text, message):
    saved(tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert error_of(lambda: load_adapter(Tiny(), tmp_path)) == message.format(file=file)


def test_load_into_a_model_with_other_or_merged_lora(tmp_path):
    _, base_sd = saved(tmp_path, LoRAConfig(rank=2, target_modules="all-linear"))
    other_rank = fresh(base_sd)
    names = inject_lora(other_rank, LoRAConfig(rank=4, target_modules="all-linear"))
    assert error_of(lambda: load_adapter(other_rank, tmp_path)) == (
        f"the model already carries LoRA at {names[:3]} with other rank/alpha than the adapter (r=2, alpha=16.0); "
        "load it into a fresh base model"
    )
    for change in (dict(alpha=8.0), dict(use_rslora=True)):
        model = fresh(base_sd)
        inject_lora(model, LoRAConfig(rank=2, target_modules="all-linear", **change))
        assert "with other rank/alpha than the adapter" in error_of(lambda m=model: load_adapter(m, tmp_path))
    merged = fresh(base_sd)
    inject_lora(merged, LoRAConfig(rank=2, target_modules="all-linear"))
    merge_lora(merged)
    msg = error_of(lambda: load_adapter(merged, tmp_path), RuntimeError)
    assert msg == "the model's LoRA is merged; unmerge_lora before loading an adapter"


def test_save_without_lora(tmp_path):
    msg = "the model has no LoRA adapter; call inject_lora (or load_adapter) first"
    assert error_of(lambda: save_adapter(Tiny(), tmp_path)) == msg
    model = Tiny()
    model.lora_config = CFG  # a config but no LoRA layers (they were replaced)
    assert error_of(lambda: lora_state_dict(model)) == msg


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


def test_a_peft_config_with_exclude_modules_loads_onto_the_modules_it_names(tmp_path):
    """PEFT writes exclude_modules into adapter_config.json: the excluded module gets no LoRA on load."""
    cfg = LoRAConfig(rank=2, alpha=4.0, target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    model, base_sd = trained(cfg)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    config.update(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])  # as PEFT saves it
    (tmp_path / CONFIG).write_text(json.dumps(config))
    other = fresh(base_sd)
    assert load_adapter(other, tmp_path) == ["layers.1.self_attn.q_proj"]
    model.eval(), other.eval()
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(ids), other(ids))
