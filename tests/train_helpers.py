"""Tiny corpora and a tiny config for the train_run / base / DDP tests (a few seconds each on 2 cores)."""

from __future__ import annotations

import random
from pathlib import Path

from experiments.config import Config, from_dict

WORDS = ["alpha", "beta", "gamma", "delta", "value", "index", "total", "count", "items", "result"]


def write_corpus(root: Path, style: str, n_docs: int = 24, lines: int = 40, seed: int = 0) -> Path:
    """Python-like documents; the "doc" style adds numpydoc-ish docstrings, so fine-tuning has something to learn."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        out = []
        for i in range(lines):
            a, b = rng.choice(WORDS), rng.choice(WORDS)
            out.append(f"def {a}_{i}({b}):")
            if style == "doc":
                out.append(f'    """Return the {a} of {b}.\n\n    Parameters\n    ----------\n    {b} : int\n    """')
            out.append(f"    return {b} + {rng.randint(0, 9)}\n")
        (root / f"mod_{d}.py").write_text("\n".join(out), encoding="utf-8")
    return root


def tiny_config(tmp: Path, **sections) -> Config:
    """A full config at toy scale; `sections` deep-update it, e.g. train={"tokens": 4096}."""
    data = {
        "model": {"base": "builtin", "max_position_embeddings": 32},
        "data": {"finetune": str(tmp / "ft"), "val_fraction": 0.2},
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "tokens": 256 * 12,
            "batch_tokens": 256,
            "micro_batch_tokens": 128,
            "lr": 1e-2,
            "log_every": 1,
            "checkpoint_every": 0,
            "device": "cpu",
            "warmup_fraction": 0.1,
        },
        "eval": {"max_tokens": 1024},
        "pretrain": {
            "corpus": str(tmp / "pt"),
            "vocab_size": 320,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 32,
            "d_ff": 64,
            "seq_len": 32,
            "tokens": 512 * 40,
            "batch_tokens": 512,
            "micro_batch_tokens": 512,
            "lr": 1e-2,
        },
    }
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return from_dict(data, source="test")


def make_corpora(tmp: Path) -> None:
    write_corpus(tmp / "pt", "plain", seed=1)
    write_corpus(tmp / "ft", "doc", seed=2)
