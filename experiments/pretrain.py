"""The model LoRA adapts: a checkpoint folder the user names, or the built-in base, pretrained once and cached.

The built-in base is a small GPT pretrained (all weights trainable, the same loop as fine-tuning) on the
built-in pretraining corpus, the Python standard library. It is cached under `data.cache_dir()/base/<key>`
(SLM_LORA_CACHE overrides the cache dir), keyed by the `pretrain:` section and the corpus fingerprint, so the
second run of a study finds it instantly. It is written to a temporary folder and renamed into place: a crash
mid-pretraining never leaves a half-written base behind.

Position embedding: RoPE. It has no table, so one base serves every context length of the context ablation
(256-2048); a learned table would end at the pretraining length. Pretraining length: 512, the default
fine-tuning context, so the rank and target-module ablations fine-tune at a length the base has seen (and 256
is inside it). Longer pretraining would cost attention time the 2-core budget does not have. The consequence:
at 1024 and 2048 the base meets rotations it never saw, so perplexity there mixes "more context" with "length
extrapolation" (measured on the default base: val ppl 281 at 512, 287 at 1024, 299 at 2048), and LoRA at
those lengths adapts to both. Each run records the base's own validation perplexity at its context length
(`base_val_ppl`), which shows the size of that effect.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from data import TrainSampler, cache_dir, load_corpus, split_corpus, token_array, train_bpe_tokenizer, val_windows
from data.cache import json_hash, short_hash, write_json_atomic
from data.tokenizer import tokenizer_files
from experiments.config import Config
from experiments.training import loop
from experiments.training.distributed import DistInfo, amp_dtype, resolve_device
from experiments.training.metrics import MetricsLog
from model import GPT, GPTConfig, save_pretrained

PRETRAIN_VAL_FRACTION = 0.05  # documents held out to report the base's own validation loss
PRETRAIN_EVAL_TOKENS = 32768


def base_key(cfg: Config, corpus_fingerprint: str) -> str:
    """The built-in base's identity: its `pretrain:` section and the corpus it learns from."""
    return json_hash({"pretrain": cfg.to_dict()["pretrain"], "corpus": corpus_fingerprint})


def base_fingerprint(folder: Path) -> str:
    """Identity of a base folder: its config, tokenizer and the size of its weights (hashing gigabytes of an
    imported checkpoint on every run would cost more than it protects)."""
    files = [f.read_bytes() if f.is_file() else b"-" for f in [folder / "config.json", *tokenizer_files(folder)]]
    weights = [
        f"{f.name}:{f.stat().st_size}" for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    ]
    return short_hash(*files, *weights)


def ensure_base(cfg: Config, progress: bool = True) -> Path:
    """The folder of the base model (config.json, model.safetensors, tokenizer.json): the user's folder as is,
    or the cached built-in base, pretrained now if it is not cached yet."""
    if cfg.model.base != "builtin":
        folder = Path(cfg.model.base)
        tokenizer_files(folder)  # fine-tuning text is tokenized with the base's own tokenizer: fail now if absent
        return folder
    corpus = load_corpus(cfg.pretrain.corpus, cfg.data.text_field, builtin="pretrain")
    folder = cache_dir() / "base" / base_key(cfg, corpus.fingerprint)
    if (folder / "model.safetensors").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        pretrain_base(cfg, corpus, tmp, progress=progress)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same base first; theirs is as good as ours
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pretrain_base(cfg: Config, corpus, out_dir: Path, progress: bool = True) -> dict:
    """Train the built-in base from scratch and write it (model, tokenizer, pretrain.json) into out_dir."""
    p = cfg.pretrain
    device = resolve_device(cfg.train.device)
    one_process = DistInfo(rank=0, world_size=1, device=device, owns_group=False)
    train_docs, val_docs = split_corpus(corpus, PRETRAIN_VAL_FRACTION)
    tok = train_bpe_tokenizer(train_docs, p.vocab_size)
    train_ids = token_array(train_docs, tok, "pretrain train", progress)
    val_ids = token_array(val_docs, tok, "pretrain val", progress)

    torch.manual_seed(p.seed)
    model = (
        GPT(
            GPTConfig(
                vocab_size=tok.get_vocab_size(),
                n_layer=p.n_layer,
                n_head=p.n_head,
                d_model=p.d_model,
                d_ff=p.d_ff,
                max_position_embeddings=p.seq_len,
                position_embedding=p.position_embedding,
                dropout=0.0,
            )
        )
        .to(device)
        .train()
    )
    plan = loop.plan_batches(p.tokens, p.batch_tokens, p.micro_batch_tokens, p.seq_len)
    settings = loop.Settings(
        lr=p.lr,
        weight_decay=p.weight_decay,
        amp_dtype=amp_dtype(cfg.train.dtype, device),
        compile=cfg.train.compile,
        log_every=max(1, plan.steps // 50),
    )
    sampler = TrainSampler(train_ids, p.seq_len, plan.micro_seqs, seed=p.seed)
    xv, yv = val_windows(val_ids, p.seq_len, PRETRAIN_EVAL_TOKENS)
    log = MetricsLog(out_dir, config=cfg.to_dict()["pretrain"])
    t0 = time.perf_counter()
    out = loop.train(
        model,
        sampler.batch,
        plan,
        settings,
        device=device,
        dist=one_process,
        val=(xv, yv),
        log=log,
        progress=progress,
        desc="pretrain base",
    )
    if out.status != "ok":
        raise RuntimeError(
            f"pretraining the built-in base diverged at step {out.diverged_step}; lower pretrain.lr (now {p.lr})."
        )
    save_pretrained(model.cpu(), out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    summary = {
        "val_loss": out.val_curve[-1][1],
        "val_loss_init": out.val_curve[0][1],
        "steps": out.steps,
        "tokens": out.train_tokens,
        "train_time_s": out.train_time_s,
        "tokens_per_s": out.train_tokens / max(out.train_time_s, 1e-9),
        "wall_time_s": time.perf_counter() - t0,
        "params": sum(q.numel() for q in model.parameters()),
        "device": str(device),
        "corpus_fingerprint": corpus.fingerprint,
        "torch_version": torch.__version__,
    }
    write_json_atomic(out_dir / "pretrain.json", summary)
    return summary
