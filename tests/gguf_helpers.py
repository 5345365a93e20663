"""Write tiny GGUF files as llama.cpp's convert_hf_to_gguf.py writes them, from a random transformers Llama / Qwen2
and a tiny byte-level BPE trained here, for the GGUF tests (tests/test_gguf*.py). Kept apart from the tests so that
the bad-input tests can write variants of one file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLE_TEXTS = [
    "def total(items):\n    return sum(x * 2 for x in items)  # 12345 + 67\n",
    "  leading spaces,\ttabs\t\tand\n\n\n   blank lines   \n",
    "héllo ünïcode — 日本語 🙂 Ωμέγα ß",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>next doc 2024-12-05",
    "It's 3.14159; they'll say we've (don't) 'quote' \"double\" 1,000,000 x1y2z3",
]
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_bpe(vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE (digits cut apart first, as SmolLM's) trained on code-like text, with SPECIALS at ids 0-2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    words = ["alpha", "beta", "gamma", "total", "items", "return", "value", "héllo", "naïve"]
    text = [f"def {a}({b}):\n    return {b} + {i}\n" for i, a in enumerate(words) for b in words]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer=trainer)
    return tok


def hf_model(arch: str, vocab_size: int, tie: bool = True, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random transformers LlamaForCausalLM (GQA: 4 heads, 2 KV heads) or Qwen2ForCausalLM (q/k/v biases), float32,
    weights drawn wide enough that quantization keeps them distinct from zero."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(seed)
    model = model_class(config_class(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


# The K-quants, which the gguf package reads but cannot write: where each block keeps its float16 scale `d` (and
# `dmin`), in bytes. Their blocks are written as random bytes with those scales set (random_k_blocks).
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None)}


def random_k_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """(rows, bytes) of `qtype` blocks: random quants and sub-scales, float16 scales 0.01 (dmin 0.005), so every
    value dequantizes to a small finite number."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d_at, dmin_at = K_QUANT_SCALES[qtype]
    data[..., d_at : d_at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if dmin_at is not None:
        data[..., dmin_at : dmin_at + 2] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers' halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    model: torch.nn.Module,
    tok: Tokenizer,
    qtype: str = "Q8_0",
    pre: str = "smollm",
    drop_keys: tuple[str, ...] = (),
    extra_tensors: dict[str, tuple[np.ndarray, str]] | None = None,
    architecture: str | None = None,
    tokenizer_model: str = "gpt2",
    metadata: dict[str, str | int | float] | None = None,
) -> Path:
    """`model` (transformers Llama / Qwen2) and `tok` as a GGUF: 2-D weights quantized to `qtype` (a K-quant: random
    blocks, see random_k_blocks), norms and biases F32, q/k rows permuted for llama; `drop_keys` leaves metadata keys
    out, `extra_tensors` adds {name: (array, type)}, `architecture` and `tokenizer_model` override
    general.architecture and tokenizer.ggml.model, `metadata` replaces or adds `<arch>.<key>` values (str, int as
    uint32, float as float32) (for the bad-input tests). `attention.key_length` is written when head_dim is not
    hidden_size / heads, as llama.cpp's converter does."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), architecture or arch)
    kv = {
        "context_length": (writer.add_context_length, cfg.max_position_embeddings),
        "embedding_length": (writer.add_embedding_length, cfg.hidden_size),
        "block_count": (writer.add_block_count, cfg.num_hidden_layers),
        "feed_forward_length": (writer.add_feed_forward_length, cfg.intermediate_size),
        "attention.head_count": (writer.add_head_count, cfg.num_attention_heads),
        "attention.head_count_kv": (writer.add_head_count_kv, cfg.num_key_value_heads),
        "rope.freq_base": (writer.add_rope_freq_base, float(cfg.rope_parameters["rope_theta"])),
        "attention.layer_norm_rms_epsilon": (writer.add_layer_norm_rms_eps, cfg.rms_norm_eps),
        "rope.dimension_count": (writer.add_rope_dimension_count, head_dim),
        "vocab_size": (writer.add_vocab_size, cfg.vocab_size),
    }
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        kv["attention.key_length"] = (writer.add_key_length, head_dim)
    extra = dict(metadata or {})
    for key, (add, value) in kv.items():
        if key not in drop_keys:
            add(extra.pop(key, value))
    for key, value in extra.items():
        typed = {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}[type(value)]
        typed(f"{arch}.{key}", value)
    if "tokenizer" not in drop_keys:
        spec = json.loads(tok.to_str())
        vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
        specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list([t for t, _ in vocab])
        writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
        writer.add_bos_token_id(cfg.bos_token_id)
        writer.add_eos_token_id(cfg.eos_token_id)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.detach().numpy().astype(np.float32)
        gname = _gguf_name(name)
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            w = _permute(w, cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads)
        if w.ndim == 2:
            kind = gguf.GGMLQuantizationType[qtype]
            if qtype in K_QUANT_SCALES:  # not the model's weights: the file is compared with transformers' reading
                data = random_k_blocks(*w.shape, qtype, np.random.default_rng(len(gname)))
            else:
                data = gguf.quants.quantize(w, kind)
            writer.add_tensor(gname, data, raw_dtype=kind)
        else:
            writer.add_tensor(gname, w)
    for name, (array, kind) in (extra_tensors or {}).items():
        qt = gguf.GGMLQuantizationType[kind]
        data = array if kind in ("F32", "F64") else gguf.quants.quantize(array, qt)
        writer.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F64") else qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if name in top:
        return top[name]
    if name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{i}.{_HF_TO_GGUF[module]}.{param}"


def stdlib_sample(folder: Path, n: int, lo: int, hi: int) -> Path:
    """A fine-tuning folder of the first `n` standard-library modules of lo to hi bytes."""
    import shutil
    import sysconfig

    folder.mkdir()
    stdlib = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if lo < p.stat().st_size < hi)
    for f in stdlib[:n]:
        shutil.copy(f, folder / f.name)
    return folder


def run_lab(args: list[str], out: Path, timeout: int, **env: str) -> list[dict]:
    """`python -m experiments.run ARGS --out OUT --no-progress` in a subprocess (the repo on PYTHONPATH, no W&B,
    `env` added); asserts it exits 0 and returns its rows."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    full_env = {**os.environ, "PYTHONPATH": str(repo), **env}
    full_env.pop("WANDB_PROJECT", None)
    cmd = [sys.executable, "-m", "experiments.run", *args, "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=repo, env=full_env, text=True, capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
