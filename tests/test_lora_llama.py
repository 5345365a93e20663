"""LoRA on Llama-family blocks: gradcheck (float64) through GQA attention, RMSNorm and the gated MLP with the fused
LoRALinear on every projection; adapters saved from our Llama / Qwen2 load with PEFT onto transformers' model with
equal logits; and the one compute-dtype rule LoRA and the model share."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.func import functional_call

import lora.layer
from lora import LoRAConfig, inject_lora, load_adapter, save_adapter
from lora.layer import _compute_dtype
from model import GPT, GPTConfig, from_pretrained

transformers.logging.set_verbosity_error()

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(**options) -> GPT:
    """Two Llama-style layers, GQA (4 query heads, 2 key/value heads), Qwen2-style q/k/v biases, float64."""
    cfg = dict(vocab_size=19, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=24, max_position_embeddings=32)
    cfg |= dict(norm="rmsnorm", mlp="gated", activation="silu", bias=False, attn_bias=True, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**cfg, **options})).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)  # not the identity
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def randomize_lora(model: torch.nn.Module, std: float = 0.3) -> None:
    """B is zero at init, which would hide every gradient that flows through it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_gradcheck_lora_through_llama_blocks(position_embedding, monkeypatch):
    """Every trainable tensor (A, B of the seven projections of a Llama block, and its q/k/v biases under
    bias="lora_only") against finite differences, with 12 tokens: each projection takes the fused custom
    Function (counted), not the plain-autograd fallback. Finite differences (eps 1e-6) measured at most 1.1e-9 from
    the analytical Jacobian (entries up to 2.2)."""
    shape = dict(vocab_size=7, n_layer=1, d_model=8, n_head=2, n_kv_head=1, d_ff=12)  # small: 248 inputs, 84 outputs
    model = tiny_llama(position_embedding=position_embedding, **shape)
    names = inject_lora(model, LoRAConfig(rank=2, target_modules=SEVEN, bias="lora_only"))
    assert len(names) == 7
    randomize_lora(model, std=0.1)  # larger: the softmax's curvature dominates the finite-difference error
    calls = []
    fused = lora.layer._LoRAFunction.apply
    monkeypatch.setattr(lora.layer._LoRAFunction, "apply", lambda *a: calls.append(1) or fused(*a))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == 7 * 2 + 3
    ids = torch.randint(0, 7, (2, 6), generator=torch.Generator().manual_seed(1))

    def logits(*tensors):
        return functional_call(model, dict(zip(params, tensors)), (ids,))

    assert torch.autograd.gradcheck(logits, tuple(params.values()), eps=1e-6, atol=5e-9, rtol=0)
    assert calls and len(calls) % 7 == 0  # every projection, on every forward


def test_fused_and_plain_lora_agree_on_llama_blocks():
    """The same model, loss and gradients through the fused Function and through plain autograd (float64).
    Measured over 3 seeds: loss 4.4e-16 apart, gradients 1.5e-14."""
    model = tiny_llama()
    inject_lora(model, LoRAConfig(rank=3, target_modules=["attention", "mlp"]))
    randomize_lora(model)
    ids = torch.randint(0, 19, (3, 10), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (True, False):
        for _, m in model.named_modules():
            if isinstance(m, lora.LoRALinear):
                m.fused = fused
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss, grads))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p, rtol=0, atol=2e-15)
    for a, b in zip(grads_f, grads_p):
        torch.testing.assert_close(a, b, rtol=0, atol=6e-14)


# ---- PEFT round trip -------------------------------------------------------------------------------------

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=53)


def hf_folder(tmp_path, family: str) -> transformers.PreTrainedModel:
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
    torch.manual_seed(3)
    hf = cls(cls.config_class(**TINY, num_key_value_heads=2, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.3)
    hf.save_pretrained(tmp_path / "base")
    return hf


@pytest.mark.parametrize(
    "family,targets,bias,saved_targets",
    [
        (
            "llama",
            ["q_proj", "v_proj", "fc1", "fc2"],
            "none",
            ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        (
            "llama",
            ["all-linear"],
            "none",
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        ("qwen2", ["attention"], "lora_only", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ],
    ids=["llama-seed-names", "llama-all-linear", "qwen2-attention-biases"],
)
def test_adapter_loads_in_peft_on_transformers(tmp_path, family, targets, bias, saved_targets):
    """Trained-looking adapter (random A and B, and for Qwen2 changed q/k/v biases) saved from our model: PEFT on
    transformers' model of the same folder gives our logits; our load_adapter into a fresh model too.
    Measured in float32 over 3 seeds: at most 7.4e-6 from PEFT (logits up to 4.8; PEFT adds x A^T B^T s to the
    base output, we merge W + s B A first), bit-equal after our own reload."""
    hf = hf_folder(tmp_path, family)
    ours = from_pretrained(tmp_path / "base")
    inject_lora(ours, LoRAConfig(rank=4, alpha=8.0, target_modules=targets, bias=bias))
    randomize_lora(ours, std=0.2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(torch.randn_like(p))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == saved_targets  # the model's own names: PEFT knows no roles

    x = torch.randint(0, 53, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ours(x)
        base = hf(x).logits
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        got = peft_model(x).logits
        assert (want - base).abs().max() > 1.0  # the adapter moves logits (measured >= 4.5) >> the tolerance
        torch.testing.assert_close(got, want, rtol=0, atol=3e-5)
        fresh = from_pretrained(tmp_path / "base")
        load_adapter(fresh, tmp_path / "adapter")
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


# ---- one compute dtype -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_compute_dtype_is_what_linear_computes_in(dtype, autocast):
    """_compute_dtype against its reference, the dtype F.linear actually returns in the same context: autocast
    changes float32/16 and bfloat16 inputs to its dtype and leaves float64 alone."""
    x, w = torch.randn(3, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        assert _compute_dtype(x) == F.linear(x, w).dtype
    expected = dtype if autocast is None or dtype == torch.float64 else autocast
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        assert _compute_dtype(x) == expected


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_float64_model_under_autocast_is_unchanged(position_embedding):
    """RoPE tables and the ALiBi bias take q's dtype (the Linears' own compute dtype), so a float64 model under
    a bf16 autocast region computes exactly what it computes outside it (it used to round the tables to bf16)."""
    model = tiny_llama(position_embedding=position_embedding).eval()
    ids = torch.randint(0, 19, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = model(ids)
    assert under.dtype == torch.float64 and torch.equal(under, plain)


# ---- one source for a layer's defaults ---------------------------------------------------------------------------


def test_lora_linear_takes_its_defaults_from_lora_config():
    default = LoRAConfig()
    layer = lora.LoRALinear(torch.nn.Linear(6, 5))
    assert (layer.rank, layer.alpha, layer.use_rslora, layer.init) == (
        default.rank,
        default.alpha,
        default.use_rslora,
        default.init,
    )
    assert layer.scaling == default.scaling and isinstance(layer.dropout, torch.nn.Identity)
    tuned = lora.LoRALinear(torch.nn.Linear(6, 5), LoRAConfig(rank=3, alpha=9.0, use_rslora=True), rank=4)
    assert (tuned.rank, tuned.alpha, tuned.scaling) == (4, 9.0, 9.0 / 2.0)  # the option overrides the config
    with pytest.raises(TypeError, match=r"unknown options \['target_modules'\]; it takes rank, alpha, dropout"):
        lora.LoRALinear(torch.nn.Linear(6, 5), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="rank must be > 0, got 0"):
        lora.LoRALinear(torch.nn.Linear(6, 5), rank=0)
