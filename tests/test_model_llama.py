"""Llama-family models (Llama, Qwen2, Mistral) in our GPT: random tiny models built with transformers, saved with
save_pretrained and loaded by from_pretrained, give transformers' logits; KV-cached decoding equals a full
recompute; folders in every layout transformers writes load; bad configs are refused with the key and the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import transformers.models.llama.modeling_llama as hf_llama
import transformers.models.mistral.modeling_mistral as hf_mistral
import transformers.models.qwen2.modeling_qwen2 as hf_qwen2
from test_model_hub import hf_cache  # noqa: F401 (a fixture: an offline Hugging Face cache in tmp_path)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from data import load_tokenizer
from model import GPT, GPTConfig, from_pretrained, save_pretrained
from model.attention import KVCache
from model.gpt import RMSNorm
from model.positions import rope_inv_freq
from model.pretrained import config_from_hf, from_hf, read_config

transformers.logging.set_verbosity_error()

VOCAB, SEQ = 101, 48
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
COMMON_GPT = dict(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, d_ff=48, max_position_embeddings=64)
# llama3 scaling with wavelengths in all three bands at head_dim 24 (theta 1e4: 6.3, 13.6, 29, 63, ...): below
# original/high_freq_factor = 8 (kept), between 8 and 32 (interpolated), above 32 (divided by factor).
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES = {
    # SmolLM2's choices: tied embeddings, rope theta 1e5
    "llama": (
        "LlamaForCausalLM",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e5}, tie_word_embeddings=True),
    ),
    "llama-gqa-biases": ("LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    # one key/value head for all four query heads, head_dim 24 != 64 / 4, Llama 3.2's rope scaling
    "llama3-mqa-head_dim": (
        "LlamaForCausalLM",
        dict(num_key_value_heads=1, head_dim=24, rope_parameters={**LLAMA3, "rope_theta": 1e4}),
    ),
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=2)),  # q/k/v biases, none elsewhere
    "mistral-sliding-window": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=7)),
}


def randomize(model: torch.nn.Module) -> None:
    """O(1) random values everywhere (biases and norm weights too), so a mapping mistake cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.5)


def hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    cls_name, options = CASES[case]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**COMMON, **options)).eval()
    randomize(model)
    return model


def saved(case: str, folder: Path, seed: int = 0) -> tuple[transformers.PreTrainedModel, GPT]:
    hf = hf_model(case, seed)
    hf.save_pretrained(folder)
    return hf, from_pretrained(folder)


def tokens(seed: int = 0, T: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_float32(case, tmp_path):
    """Measured over 3 seeds per case: at most 3.4e-6 with logits up to 4.7 (float32 rounding of either side;
    transformers' own float32 logits are 3.8e-6 from its float64 ones)."""
    hf, ours = saved(case, tmp_path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1.5e-5)


def _float64_internals(monkeypatch) -> None:
    """transformers computes RMSNorm and the RoPE angles in float32 even in a float64 model (our RMSNorm keeps
    float64): make those float64 too, so the float64 comparison shows the two compute the same function."""

    def rms_norm(self, h):
        x = h.to(torch.promote_types(h.dtype, torch.float32))
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(h.dtype)

    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    for module, prefix in ((hf_llama, "Llama"), (hf_qwen2, "Qwen2"), (hf_mistral, "Mistral")):
        monkeypatch.setattr(getattr(module, prefix + "RMSNorm"), "forward", rms_norm)
        monkeypatch.setattr(getattr(module, prefix + "RotaryEmbedding"), "forward", rotary)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_float64(case, tmp_path, monkeypatch):
    """With transformers' float32 internals made float64 and both sides' RoPE tables built from the same
    frequencies (compared on their own below), the logits agree to float64 rounding: measured 0 for four cases,
    5.8e-15 for llama3 (3 seeds each)."""
    _float64_internals(monkeypatch)
    hf, ours = saved(case, tmp_path)
    hf.double()
    ours.double()
    angle = torch.arange(ours.rope_cos.shape[0], dtype=torch.float64)[:, None] * hf.model.rotary_emb.inv_freq
    ours.rope_cos, ours.rope_sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=3e-14)


@pytest.mark.parametrize("case", ["llama", "llama3-mqa-head_dim"])
def test_rope_frequencies_equal_transformers(case):
    """Our float64 frequencies (plain and llama3-scaled) against transformers' float32 ones: measured relative
    difference 6.7e-8 plain, 2.5e-7 llama3-scaled (float32 rounding of a few operations)."""
    hf = hf_model(case)
    cfg = config_from_hf(hf.config.to_dict(), "test")[1]
    ours = rope_inv_freq(cfg.rotary_dim, cfg.rope_base, cfg.rope_scaling)
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq.double(), rtol=1e-6, atol=0)
    if cfg.rope_scaling is not None:  # the scaling changed something, in each of its three bands
        plain = rope_inv_freq(cfg.rotary_dim, cfg.rope_base)
        ratio = plain / ours
        assert ratio[0] == 1 and ratio[-1] == 8 and ((ratio > 1) & (ratio < 8)).any()


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_equals_full_recompute(case, tmp_path):
    """Prefill, a chunk after the cache (the sliding window crosses it), then token by token: float64 logits of the
    cached path equal one full forward. Measured at most 6.0e-15 (3 seeds per case)."""
    _, ours = saved(case, tmp_path)
    ours.double()
    x = tokens(1, T=24)
    with torch.no_grad():
        full = ours(x)
        cache = KVCache(ours.config.n_layer, x.shape[1])
        parts = [ours.lm_head(ours.hidden_states(x[:, :9], cache)), ours.lm_head(ours.hidden_states(x[:, 9:14], cache))]
        parts += [ours.lm_head(ours.hidden_states(x[:, t : t + 1], cache)) for t in range(14, x.shape[1])]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=3e-14)
    if ours.config.n_kv_head < ours.config.n_head:  # the cache holds the key/value heads only
        assert cache.k[0].shape[1] == ours.config.n_kv_head


@pytest.mark.parametrize("case", ["llama3-mqa-head_dim", "mistral-sliding-window"])
def test_greedy_generation_equals_transformers(case, tmp_path):
    hf, ours = saved(case, tmp_path)
    hf.double()
    ours.double()
    x = tokens(2, T=6)
    ids = ours.generate(x, max_new_tokens=14, temperature=0)  # 20 tokens: past the window of 7
    want = hf.generate(x, max_new_tokens=14, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    assert torch.equal(ids, want)


def test_module_names_follow_the_architecture(tmp_path):
    _, llama = saved("llama-gqa-biases", tmp_path)
    names = {n for n, _ in llama.named_modules()}
    want = {f"layers.0.self_attn.{p}_proj" for p in "qkvo"} | {f"layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert want <= names and not {"layers.0.self_attn.out_proj", "layers.0.fc1", "layers.0.fc2"} & names
    assert llama.hf_module_prefix == "model."
    opt = {n for n, _ in GPT(GPTConfig(vocab_size=11, n_layer=1, d_model=16, n_head=2, d_ff=32)).named_modules()}
    assert {"layers.0.self_attn.out_proj", "layers.0.fc1", "layers.0.fc2"} <= opt and "layers.0.mlp" not in opt


def test_shapes_and_biases_per_family(tmp_path):
    """Qwen2: q/k/v biases only; Llama with attention_bias/mlp_bias: every projection; GQA: k/v of n_kv_head heads."""
    _, qwen = saved("qwen2", tmp_path / "q")
    attn = qwen.layers[0].self_attn
    assert [m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)] == [1, 1, 1, 0]
    assert qwen.layers[0].mlp.gate_proj.bias is None
    assert attn.k_proj.weight.shape == (2 * 16, 64) and attn.q_proj.weight.shape == (64, 64)
    _, llama = saved("llama-gqa-biases", tmp_path / "l")
    assert all(m.bias is not None for n, m in llama.named_modules() if n.endswith("_proj"))
    _, mqa = saved("llama3-mqa-head_dim", tmp_path / "m")
    assert mqa.layers[0].self_attn.o_proj.weight.shape == (64, 4 * 24)


def test_sharded_safetensors_and_older_config_keys(tmp_path):
    """A sharded folder (model.safetensors.index.json) and a config.json with the pre-5 `rope_theta` +
    `rope_scaling` keys load to the same model as transformers' own reading of them."""
    hf = hf_model("llama3-mqa-head_dim")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_type"}, "type": rope["rope_type"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reread = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reread.config.rope_parameters["rope_type"] == "llama3"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path)(x), reread(x).logits, rtol=0, atol=1.5e-5)
    assert read_config(tmp_path)[1].rope_scaling == LLAMA3


def _tokenizer(folder: Path) -> None:
    """A small byte-level BPE written by transformers' Qwen2Tokenizer (its pre-tokenizer regex, as real Qwen2
    folders have). Only the tokenizer is compared: its ids run past the tiny model's vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["def f(x):\n    return x * 2  # double\n", "class A:\n    pass\n"] * 20
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False))
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in bpe["merges"]]
    transformers.Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges).save_pretrained(folder)


def test_tokenizer_json_of_the_folder_is_used(tmp_path):
    saved("qwen2", tmp_path)
    _tokenizer(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.tokenizer_path == str(tmp_path / "tokenizer.json")
    text = "def g(y):\n    return y  # same, 2024!\n<|endoftext|>"
    ours = load_tokenizer(tmp_path).encode(text).ids
    assert ours == transformers.AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False).input_ids
    assert len(ours) > 5


def test_org_name_through_the_hugging_face_cache(tmp_path, hf_cache):  # noqa: F811
    hf = hf_model("mistral-sliding-window")
    folder = tmp_path / "upload"
    hf.save_pretrained(folder)
    _tokenizer(folder)
    snapshot = hf_cache("mistralai/Tiny-Mistral", folder)
    model = from_pretrained("mistralai/Tiny-Mistral")
    assert model.tokenizer_path == str(snapshot / "tokenizer.json")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1.5e-5)


def test_save_pretrained_round_trip_of_a_llama_style_model(tmp_path):
    """Our own format (slm-gpt config.json) keeps every new option: rope scaling, head_dim, GQA, biases, tying."""
    _, ours = saved("llama3-mqa-head_dim", tmp_path / "hf")
    save_pretrained(ours, tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours")
    assert again.config == ours.config and again.config.rope_scaling == LLAMA3
    x = tokens()
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_from_hf_takes_a_config_dict_and_transformers_names():
    """The entry point for other formats (GGUF): a config dict and tensors under transformers' names."""
    hf = hf_model("qwen2")
    model = from_hf(hf.config.to_dict(), hf.state_dict(), source="memory")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1.5e-5)
    state = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), **hf.state_dict()}  # older files; first
    from_hf(hf.config.to_dict(), state, source="memory")
    with pytest.raises(ValueError, match=r"^memory: model_type 'bert' is not supported"):
        from_hf({**hf.config.to_dict(), "model_type": "bert"}, hf.state_dict(), source="memory")
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"^memory: checkpoint lacks tensors \['layers.1.mlp.up_proj.weight'\]"):
        from_hf(hf.config.to_dict(), state, source="memory")


@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 3.0)])
def test_llama3_frequencies_equal_transformers_at_other_band_edges(low, high):
    """Both band edges moved (original / high = 10.7, original / low = 16 at (2, 3)): the wavelengths 6.3, 13.6, 29,
    63, ... of head_dim 24 then fall in each band another way than at Llama 3's (1, 4)."""
    scaling = {**LLAMA3, "low_freq_factor": low, "high_freq_factor": high}
    hf_cfg = transformers.LlamaConfig(
        hidden_size=96,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_parameters={**scaling, "rope_theta": 1e4},
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    torch.testing.assert_close(rope_inv_freq(24, 1e4, scaling), theirs.double(), rtol=1e-6, atol=0)


def test_rope_keys_of_either_config_layout_with_transformers_defaults():
    """rope_theta absent is LlamaConfig's 10000.0 (pre-5 keys or rope_parameters alike); the rotary fraction is read
    from rope_parameters or the top level, and is never passed on as a scaling key."""
    base = hf_model("llama").config.to_dict()

    def ours(**change) -> GPTConfig:
        hf = {k: v for k, v in {**base, **change}.items() if v is not None}
        return config_from_hf(hf, "test")[1]

    assert ours(rope_parameters=None, rope_theta=None, rope_scaling=None).rope_base == 10000.0
    assert ours(rope_parameters={"rope_type": "default"}).rope_base == 10000.0
    plain = {"rope_type": "default", "rope_theta": 1e4}
    assert ours(rope_parameters={**plain, "partial_rotary_factor": 0.5}).rotary_fraction == 0.5
    assert ours(rope_parameters=plain, partial_rotary_factor=0.5).rotary_fraction == 0.5
    scaled = ours(rope_parameters={**LLAMA3, "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    assert scaled.rope_scaling == LLAMA3 and scaled.rotary_fraction == 0.5


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_a_config_with_only_the_required_keys_takes_transformers_defaults(model_type):
    """Our reading of a config.json that leaves every optional key out equals our reading of the same config filled
    in by transformers' own config class (Mistral's absent sliding_window is its 4096, not none; an absent
    num_key_value_heads is 32 in Qwen2, 8 in Mistral, n_head in Llama: 64 heads here, which both divide)."""
    required = dict(COMMON, hidden_size=512, num_attention_heads=64)
    filled = transformers.AutoConfig.for_model(model_type, **required).to_dict()
    bare = config_from_hf({"model_type": model_type, **required}, "test")[1]
    assert bare == config_from_hf(filled, "test")[1]
    assert bare.kv_heads == {"llama": 64, "qwen2": 32, "mistral": 8}[model_type]
    assert config_from_hf({"model_type": model_type, **required, "num_key_value_heads": None}, "test")[1].kv_heads == 64


def test_llama_config_reads_dropout_and_context_and_absent_bias_keys_mean_none():
    base = hf_model("llama").config.to_dict()
    cfg = config_from_hf({**base, "attention_dropout": 0.1}, "test")[1]
    assert (cfg.attention_dropout, cfg.max_position_embeddings) == (0.1, 64)  # 64: not GPTConfig's default
    bare = config_from_hf({k: v for k, v in base.items() if k not in ("attention_bias", "mlp_bias")}, "test")[1]
    assert (bare.attn_bias, bare.o_bias, bare.mlp_bias) == (False, False, False)  # LlamaConfig's defaults


def test_rmsnorm_of_a_bf16_input_is_computed_in_float32_and_rounded_before_the_weight():
    """As transformers' LlamaRMSNorm: the mean of squares in float32 (bf16's 8 bits would shift it), the normalised
    value rounded to bf16, then the float32 weight. Compared bit for bit with that recipe written out."""
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(x), expected)
    assert repr(norm) == "RMSNorm((64,), eps=1e-06)"


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize(
    ("bias", "mlp_bias", "has_bias"),
    [(True, None, True), (True, False, False), (False, True, True), (False, None, False)],
)
def test_the_mlp_takes_the_blocks_bias_unless_mlp_bias_says_otherwise(gated, bias, mlp_bias, has_bias):
    """Both MLP kinds: gate/up/down_proj (gated) and fc1/fc2 (GPT-2/OPT-style)."""
    kind = dict(mlp="gated", norm="rmsnorm", activation="silu") if gated else {}
    block = GPT(GPTConfig(**kind, n_head=4, d_model=32, bias=bias, mlp_bias=mlp_bias)).layers[0]
    linears = (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj) if gated else (block.fc1, block.fc2)
    assert [lin.bias is not None for lin in linears] == [has_bias] * len(linears)


def test_rope_tables_grown_for_a_longer_sequence_keep_the_llama3_scaling():
    """A model built with a 16-position table, run on 40 tokens, against the same weights built with 64 positions
    (no growing): equal logits. Grown tables without the scaling would differ past the first wavelengths."""
    options = dict(COMMON_GPT, n_head=4, d_model=96, head_dim=24, rope_scaling=LLAMA3, norm="rmsnorm", mlp="gated")
    torch.manual_seed(0)
    big = GPT(GPTConfig(**{**options, "max_position_embeddings": 64})).double()
    small = GPT(GPTConfig(**{**options, "max_position_embeddings": 16})).double()
    small.load_state_dict(big.state_dict())
    x = tokens(T=40)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x), rtol=0, atol=1e-12)


def test_from_hf_takes_bf16_tensors_over_as_float32():
    """from_hf's promise (a float32 GPT) for a bf16 checkpoint's tensors, without from_pretrained's final .to()."""
    hf = hf_model("qwen2")
    model = from_hf(hf.config.to_dict(), {k: v.bfloat16() for k, v in hf.state_dict().items()}, source="memory")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    q = hf.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, q.bfloat16().float())


def test_a_sliding_window_over_alibi_sees_only_the_window():
    """ALiBi is relative, so with a window of 4 in one layer the last position's logits are those of the model run
    on the last 4 tokens alone (float64): the window applied to ALiBi's float bias, not in place of it. (With more
    layers the receptive field grows by 3 per layer.)"""
    torch.manual_seed(0)
    options = {**COMMON_GPT, "n_layer": 1, "position_embedding": "alibi", "sliding_window": 4}
    model = GPT(GPTConfig(**options)).double().eval()
    x = tokens(T=10)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, -1], model(x[:, -4:])[:, -1], rtol=0, atol=1e-12)


SWA = "Qwen2 with use_sliding_window=true is not supported (its window covers only some layers)"
NOT_ROPE = "rope_parameters must be one dict with a numeric rope_theta, got "


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_sliding_window": True}, SWA),
        ({"layer_types": ["full_attention", "sliding_attention"]}, SWA),
        ({"rope_parameters": [1e4]}, NOT_ROPE + "[10000.0]"),
        ({"rope_parameters": {"rope_theta": "1e4"}}, NOT_ROPE + "{'rope_theta': '1e4'}"),
    ],
    ids=["use_sliding_window", "layer_types", "rope_parameters-list", "rope_theta-text"],
)
def test_qwen2_sliding_window_and_rope_parameters_errors_are_exact(change, message):
    with pytest.raises(ValueError) as err:
        config_from_hf({**hf_model("qwen2").config.to_dict(), **change}, "test")
    assert str(err.value) == f"test: {message}"


# ---- bad input: named before any weight is read ---------------------------------------------------------


def _config_file(tmp_path: Path, case: str, **change) -> Path:
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors: a config error must come first")
    return tmp_path / "config.json"


@pytest.mark.parametrize(
    "case,change,message",
    [
        ("llama", {"intermediate_size": None}, "lacks the key 'intermediate_size' that a llama config has"),
        ("qwen2", {"num_hidden_layers": None}, "lacks the key 'num_hidden_layers' that a qwen2 config has"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_scaling type 'yarn' is not supported; supported: llama3",
        ),
        (
            "llama",
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling type 'dynamic' is not supported; supported: llama3",
        ),
        (
            "llama3-mqa-head_dim",
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
            "llama3 rope_scaling needs exactly the keys factor, low_freq_factor, high_freq_factor, "
            "original_max_position_embeddings; missing ['low_freq_factor', 'high_freq_factor', "
            "'original_max_position_embeddings']",
        ),
        (
            "qwen2",
            {"num_key_value_heads": 3},
            "GPTConfig.n_head (4) must be divisible by n_kv_head (3): each key/value head serves an equal group",
        ),
        ("qwen2", {"use_sliding_window": True}, "Qwen2 with use_sliding_window=true is not supported"),
        ("mistral-sliding-window", {"hidden_act": "relu2"}, "hidden_act 'relu2' is not supported"),
    ],
    ids=[
        "no-intermediate_size",
        "no-num_hidden_layers",
        "yarn",
        "dynamic-old-key",
        "llama3-keys",
        "gqa",
        "qwen2-swa",
        "act",
    ],
)
def test_bad_configs_name_the_file_and_the_problem(tmp_path, case, change, message):
    file = _config_file(tmp_path, case, **change)
    for load in (from_pretrained, read_config):
        with pytest.raises(ValueError, match=f"^{re.escape(str(file))}.*{re.escape(message)}"):
            load(tmp_path)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(norm="batchnorm"), "GPTConfig.norm='batchnorm' is unknown; choose one of layernorm, rmsnorm"),
        (dict(mlp="moe"), "GPTConfig.mlp='moe' is unknown; choose one of standard, gated"),
        (dict(n_kv_head=0), "GPTConfig.n_kv_head must be a positive int or None, got 0"),
        (dict(head_dim=True), "GPTConfig.head_dim must be a positive int or None, got True"),
        (dict(sliding_window=64.0), "GPTConfig.sliding_window must be a positive int or None, got 64.0"),
        (dict(d_model=30), "GPTConfig.d_model (30) must be divisible by n_head (4); pick n_head among the divisors"),
        (dict(position_embedding="alibi", rope_scaling=LLAMA3), "rope_scaling applies to rope positions, not 'alibi'"),
        (dict(rope_scaling={**LLAMA3, "low_freq_factor": 4.0}), "needs high_freq_factor > low_freq_factor, got 4.0"),
        (dict(rope_scaling={**LLAMA3, "factor": "8"}), "llama3 rope_scaling values must be positive numbers"),
        (dict(rope_scaling={**LLAMA3, "low_freq_factor": 0}), "llama3 rope_scaling values must be positive numbers"),
        (
            dict(position_embedding="rope", rope_scaling=[8.0]),
            "GPTConfig.rope_scaling must be a dict or None, got [8.0]",
        ),
        (
            dict(position_embedding="rope", rope_scaling={**LLAMA3, "beta": 1.0}),
            "llama3 rope_scaling needs exactly the keys factor, low_freq_factor, high_freq_factor, "
            "original_max_position_embeddings; missing [], unknown ['beta']",
        ),
    ],
)
def test_config_options_are_checked(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GPTConfig(**{"n_head": 4, "d_model": 32, **options})


def test_explicit_head_dim_needs_no_divisible_d_model():
    cfg = GPTConfig(d_model=30, n_head=4, head_dim=8, n_kv_head=2, mlp="gated", norm="rmsnorm", activation="silu")
    assert (cfg.head_dim, cfg.kv_heads) == (8, 2)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    y = GPT(cfg)(torch.randint(0, cfg.vocab_size, (1, 5)))
    assert y.shape == (1, 5, cfg.vocab_size) and torch.isfinite(y).all()


def test_max_seq_len_is_the_table_size_of_table_positions_only():
    assert [
        GPTConfig(position_embedding=k).max_seq_len for k in ("learned", "sinusoidal", "rope", "alibi", "none")
    ] == [512, 512, None, None, None]


def test_no_graph_breaks_under_dynamo_with_lora():
    """A Llama-style model with everything on (GQA, biases, llama3 scaling, a sliding window) and LoRA on every
    projection traces as one graph, loss included (the lab's train.compile)."""
    from lora import LoRAConfig, inject_lora

    options = dict(norm="rmsnorm", mlp="gated", activation="silu", bias=False, attn_bias=True, n_kv_head=2)
    model = GPT(GPTConfig(**COMMON_GPT, **options, sliding_window=8, rope_scaling=LLAMA3))
    inject_lora(model, LoRAConfig(rank=2, target_modules=["attention", "mlp"]))
    x = tokens(T=12)
    model.loss(x, x)  # tables already built: the common path
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda a, b: model.loss(a, b))(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
