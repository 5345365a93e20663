"""Read a GGUF file (llama.cpp's format) with the `gguf` package: its metadata as a transformers-style config dict
(the keys of LlamaConfig / Qwen2Config) and its tensors dequantized to float32 under transformers' names, which is
what model.pretrained builds a Llama-family GPT from.

Two things differ from a transformers folder. llama.cpp's converter permutes the rows of q_proj and k_proj of the
`llama` architecture (its RoPE pairs neighbouring dims, transformers' pairs dim i with i + head_dim/2); they are
permuted back here, as transformers' own GGUF loading does. `qwen2` files are stored unpermuted. And Llama 3's
RoPE scaling is not stored as parameters but as a table of per-frequency divisors (`rope_freqs.weight`); the
parameters are recovered from it (`_llama3_scaling`) and the table is checked against them.

Every problem is a ValueError naming the file, raised before any tensor is dequantized.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Tensor types dequantized with gguf.quants.dequantize: floats, the legacy block quants and the K-quants.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
GGUF_MAGIC = b"GGUF"
# llama.cpp tensor names -> transformers' (LlamaForCausalLM / Qwen2ForCausalLM); blk.N.<key> -> model.layers.N.<value>
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's RoPE scaling as a table; read into the config, not a weight
# Llama 3.1 / 3.2 publish these with factor 8 / 32; the table of a file is matched against them (_llama3_scaling).
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def open_gguf(path: str | Path) -> Any:
    """A gguf.GGUFReader of `path` (memory-mapped: nothing is dequantized yet). A missing, non-GGUF or truncated
    file is a ValueError (FileNotFoundError when missing) naming the file."""
    import gguf  # a heavy import that only GGUF users pay

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such GGUF file.")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{p} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}.")
    try:
        return gguf.GGUFReader(p)
    except Exception as e:  # the reader fails on a cut-off file with numpy's own ValueError / IndexError
        raise ValueError(
            f"{p} cannot be read as GGUF; the file is truncated or damaged ({type(e).__name__}: {e}). "
            "Download or convert it again."
        ) from None


def field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of a metadata key: a scalar, a string, or a list for an array; `default` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader: Any, source: str) -> str:
    """`general.architecture`, checked to be one we build."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return arch


def read_gguf(
    path: str | Path, tensors: bool = True, check: Callable[[dict], object] | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(transformers-style config dict, {transformers name: float32 tensor}) of a GGUF file. `check(config)` runs
    before any tensor is dequantized (from_pretrained maps the config onto ours there, so a config it refuses costs
    no work). With tensors=False the tensor dict is empty: the config alone, for checks before any work."""
    source = str(path)
    reader = open_gguf(path)
    arch = architecture(reader, source)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(
            f"{source}: the GGUF has no tokenizer metadata (tokenizer.ggml.tokens); fine-tuning needs the model's own "
            "tokenizer. Convert the model again with llama.cpp's convert_hf_to_gguf.py, which stores it."
        )
    by_name = {t.name: t for t in reader.tensors}
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if unsupported:
        raise ValueError(
            f"{source}: tensor type(s) {', '.join(unsupported)} cannot be dequantized here; supported: "
            f"{', '.join(SUPPORTED_TYPES)}. Use a GGUF quantized to one of those."
        )
    names = {t.name: _hf_name(t.name, source) for t in reader.tensors if t.name != ROPE_FREQS}
    config = _config(reader, arch, by_name, source)
    if check is not None:
        check(config)
    if not tensors:
        return config, {}
    out: dict[str, torch.Tensor] = {}
    for name, hf_name in names.items():
        weights = _dequantize(by_name[name])
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
            weights = _unpermute(weights, heads)
        out[hf_name] = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32).copy())
    return config, out


def _dequantize(tensor: Any) -> np.ndarray:
    """float32 values in (rows, cols) order, as torch's Linear stores them (GGUF lists shapes innermost first)."""
    from gguf.quants import dequantize

    return dequantize(tensor.data, tensor.tensor_type).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it interleaves the two halves that rotate together
    (rows 0, d/2, 1, d/2+1, ...); transformers keeps them as halves. Biases (1-D) are permuted the same way."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, source: str) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(
        f"{source}: tensor {name!r} has no place in a Llama-family model (known: {', '.join(_TOP_NAMES)}, "
        f"blk.N.{{{','.join(_BLOCK_NAMES)}}}); a mixture-of-experts or fused-QKV file is not supported."
    )


def _config(reader: Any, arch: str, tensors: dict[str, Any], source: str) -> dict:
    """LlamaConfig / Qwen2Config keys from `<arch>.*` metadata; a missing required key is named."""

    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{source}: the GGUF lacks the metadata key {arch}.{key} that a {arch} model needs.")
        return value

    d, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", d // heads))
    rotary = field(reader, f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ValueError(
            f"{source}: RoPE rotates {rotary} of each head's {head_dim} dims; only full rotation is supported."
        )
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported (Llama 3's, as rope_freqs, is).")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(field(reader, f"{arch}.vocab_size", len(tokens.data))),
        "hidden_size": d,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "rope_scaling": None,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    for key in ("bos_token_id", "eos_token_id"):
        value = field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    if ROPE_FREQS in tensors:
        config["rope_scaling"] = _llama3_scaling(_dequantize(tensors[ROPE_FREQS]), config, source)
    return config


def llama3_divisors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """What Llama 3's RoPE scaling divides each frequency by (llama.cpp's rope_freqs table): 1 for wavelengths
    shorter than original/high_freq_factor, `factor` for those longer than original/low_freq_factor, and a smooth
    blend between."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))


def _llama3_scaling(divisors: np.ndarray, config: dict, source: str) -> dict:
    """Llama 3's rope_scaling from the file's divisor table: the factor is its largest entry; the other parameters
    are Llama 3's published ones, accepted only if they reproduce the whole table (float32 rounding)."""
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **_LLAMA3_DEFAULTS}
    expected = llama3_divisors(config["head_dim"], config["rope_theta"], scaling)
    if expected.shape != divisors.shape or not np.allclose(divisors, expected, rtol=1e-5, atol=0):
        raise ValueError(
            f"{source}: its RoPE frequency table ({ROPE_FREQS}) is not Llama 3's scaling with factor "
            f"{scaling['factor']:g}, low/high frequency factors 1/4 and original context 8192; not supported."
        )
    return scaling
