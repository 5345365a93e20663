"""The model LoRA adapts: a checkpoint folder the user names, or the built-in base, pretrained once and cached.

The built-in base is a small GPT pretrained (all weights trainable, the same loop as fine-tuning) on the
built-in pretraining corpus, the Python standard library. It is cached under `data.cache_dir()/base/<key>`
(SLM_LORA_CACHE overrides the cache dir), keyed by the `pretrain:` section and the corpus fingerprint, so the
second run of a study finds it instantly.

Nothing is lost: the base is built in `<key>.partial/` and renamed into place when complete. Each phase
checkpoints every CHECKPOINT_EVERY steps and, when it ends, leaves its weights in `phase<N>/` (a loadable model
folder), so a rerun after Ctrl-C or a crash resumes where the last process stopped and ends with the weights an
uninterrupted pretraining gives. A lock file makes a second process wait instead of training the same base.
A diverged pretraining is discarded (the same config would diverge again) with a message naming the learning rate.

Recipe: phase 1, `tokens` (2 M) at `seq_len` 512 with lr 3e-3; phase 2, `long_tokens` (819,200) at
`long_seq_len` 2048 with lr 2e-3, on the same document stream (its step count continues phase 1's, so it draws
new windows). Phase 2 starts a fresh AdamW and its own warmup + cosine decay: the re-warm from a decayed learning
rate is the variant measured below, and it keeps the engine's loop unchanged. Every context of the study
(256-2048) then lies inside what the base was trained on, so the context ablation measures context, not length
extrapolation.

Position embedding: RoPE. It has no table, so one base serves every context length; a learned table would end at
the longest pretraining length. Before the length schedule, the base (2 M tokens at 512 only) extrapolated past
512: val ppl on the fine-tuning corpus 282.8 / 281.2 / 287.0 / 299.0 at 256 / 512 / 1024 / 2048.
With the schedule (2026-12-03, 2 CPU cores, AMD EPYC, float32; phase 1 340 s, phase 2 173 s of training):
val ppl 281.7 / 277.6 / 276.4 / 277.2 at the same lengths: no extrapolation penalty (+0.3 % from 1024 to 2048),
and little gain from context beyond 512 (-0.4 % at 1024). Measured before choosing: the whole 2 M tokens at 2048
gave a far weaker base (held-out pretraining loss 5.41 against 4.57; 540 / 528 / 521 / 519), and phase 2 at lr
1e-3 for 410 k tokens less gain (280.2 / 276.0 / 274.4 / 275.0) than the 819 k tokens at 2e-3 kept here.
Each run records the base's own validation perplexity at its context length (`base_val_ppl`).

Source set (forgetting): the held-out pretraining documents (PRETRAIN_VAL_FRACTION of the corpus, split by a hash of
each document's name; never trained on), tokenized, are stored in the base folder as SOURCE_VAL_FILE.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from data import (
    Corpus,
    TrainSampler,
    cache_dir,
    load_corpus,
    split_corpus,
    token_array,
    train_bpe_tokenizer,
    val_windows,
)
from data.cache import json_hash, short_hash, write_json_atomic
from data.tokenizer import tokenizer_files
from experiments.config.config import Config, PretrainConfig
from model import GPT, GPTConfig, from_pretrained, save_pretrained
from training import loop
from training.checkpoint import CHECKPOINT_FILE
from training.distributed import DistInfo, resolve_device
from training.metrics import MetricsLog
from training.precision import amp_dtype, dtype_label

PRETRAIN_VAL_FRACTION = 0.05  # documents held out: the base's own validation loss, and the source set of forgetting
PRETRAIN_EVAL_TOKENS = 32768
GGUF_HEAD_BYTES = 16 << 20  # a GGUF's metadata (config, vocabulary, merges: ~2 MB for SmolLM2) fits in this
SOURCE_VAL_FILE = "source_val.npy"  # in a base folder: its held-out pretraining documents as token ids
CHECKPOINT_EVERY = 20  # pretraining steps between checkpoints: at most ~30 s of 2-core work lost to an interruption
# Each phase's schedule beyond the `pretrain:` section (so not in the base's key: changing one needs a new key):
# linear warmup over 5 % of its steps, cosine decay to 10 % of its lr, gradients clipped at norm 1.
PRETRAIN_WARMUP_FRACTION = 0.05
PRETRAIN_MIN_LR_RATIO = 0.1
PRETRAIN_GRAD_CLIP = 1.0
PHASE_DONE = "phase.json"  # in a phase folder: written last, when the phase's weights are complete


class PretrainDiverged(ValueError):
    """The built-in base's loss became non-finite: a config problem (the learning rate), reported without traceback."""


@dataclass(frozen=True)
class Phase:
    """One stretch of pretraining at one sequence length."""

    name: str  # its folder in the work dir
    seq_len: int
    tokens: int
    lr: float
    lr_key: str  # the config key to lower if it diverges


def phases(p: PretrainConfig) -> list[Phase]:
    """The length schedule: `tokens` at seq_len, then `long_tokens` at long_seq_len (if any)."""
    out = [Phase("phase1", p.seq_len, p.tokens, p.lr, "pretrain.lr")]
    if p.long_tokens:
        out.append(Phase("phase2", p.long_seq_len, p.long_tokens, p.long_lr, "pretrain.long_lr"))
    return out


def base_gpt_config(p: PretrainConfig, vocab_size: int) -> GPTConfig:
    """The built-in base's architecture: its position table ends at the longest pretraining phase; vocab_size
    is the trained tokenizer's (at most p.vocab_size)."""
    return GPTConfig(
        vocab_size=vocab_size,
        n_layer=p.n_layer,
        n_head=p.n_head,
        d_model=p.d_model,
        d_ff=p.d_ff,
        max_position_embeddings=max(ph.seq_len for ph in phases(p)),
        position_embedding=p.position_embedding,
        dropout=0.0,
    )


def pretrain_split(corpus: Corpus) -> tuple[Corpus, Corpus]:
    """(train, held-out) documents of the pretraining corpus: the base never trains on the held-out ones."""
    return split_corpus(corpus, PRETRAIN_VAL_FRACTION)


def pretrain_dtype(cfg: Config) -> torch.dtype | None:
    """The autocast dtype the built-in base trains in: train.dtype resolved on train.device, as fine-tuning does."""
    return amp_dtype(cfg.train.dtype, resolve_device(cfg.train.device))


def base_key(cfg: Config, corpus_fingerprint: str) -> str:
    """The built-in base's identity: its `pretrain:` section, the corpus it learns from, and the precision it trains
    in (a bf16 base and a float32 base are different weights, so neither is reused for the other; a float32 base
    keeps the key it had before precision was part of it)."""
    key = {"pretrain": cfg.to_dict()["pretrain"], "corpus": corpus_fingerprint}
    dtype = pretrain_dtype(cfg)
    return json_hash(key if dtype is None else {**key, "dtype": dtype_label(dtype)})


def base_fingerprint(folder: Path) -> str:
    """Identity of a base folder: its config, tokenizer and the size of its weights (hashing gigabytes of an
    imported checkpoint on every run would cost more than it protects). A GGUF file holds all three: its metadata
    (config and tokenizer) lies before the weights, so its first GGUF_HEAD_BYTES and its size identify it."""
    if is_gguf(folder):
        with folder.open("rb") as f:
            return short_hash(f.read(GGUF_HEAD_BYTES), str(folder.stat().st_size))
    files = [f.read_bytes() if f.is_file() else b"-" for f in [folder / "config.json", *tokenizer_files(folder)]]
    weights = [
        f"{f.name}:{f.stat().st_size}" for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    ]
    return short_hash(*files, *weights)


def is_gguf(base: Path) -> bool:
    """A base given as a GGUF file (`--base_model x.gguf`, or a named base: smollm2-135m), not as a folder."""
    return base.suffix == ".gguf" and base.is_file()


@contextmanager
def _only_builder(folder: Path) -> Iterator[None]:
    """Hold `folder`.lock: one process builds a base, any other waits for it (and then finds it built)."""
    lock = FileLock(f"{folder}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that is pretraining the base {folder.name} ...", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def ensure_base(cfg: Config, progress: bool = True) -> Path:
    """The folder of the base model (config.json, model.safetensors, tokenizer.json): the user's folder or GGUF file
    as is, or the cached built-in base, pretrained now (or resumed) if it is not cached yet."""
    if cfg.model.base != "builtin":
        folder = Path(cfg.model.base)
        if not is_gguf(folder):  # a GGUF file carries its tokenizer (checked by preflight)
            tokenizer_files(folder)  # fine-tuning text is tokenized with the base's own tokenizer: fail now if absent
        return folder
    corpus = load_corpus(cfg.pretrain.corpus, cfg.data.text_field, builtin="pretrain")
    folder = cache_dir() / "base" / base_key(cfg, corpus.fingerprint)
    if (folder / "model.safetensors").is_file():
        return folder
    with _only_builder(folder):
        if not (folder / "model.safetensors").is_file():
            work = folder.with_name(f"{folder.name}.partial")  # a fixed name: the next process resumes from it
            work.mkdir(parents=True, exist_ok=True)
            try:
                pretrain_base(cfg, corpus, work, progress=progress)
            except PretrainDiverged:
                shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming: the same config diverges again
                raise
            os.replace(work, folder)
    return folder


def pretrain_base(cfg: Config, corpus: Corpus, out_dir: Path, progress: bool = True) -> dict:
    """Train the built-in base from scratch (or resume the phases `out_dir` holds) and write it: model,
    tokenizer, its held-out tokens (SOURCE_VAL_FILE) and pretrain.json."""
    p = cfg.pretrain
    device = resolve_device(cfg.train.device)
    train_docs, val_docs = pretrain_split(corpus)
    tok = train_bpe_tokenizer(train_docs, p.vocab_size)
    train_ids = token_array(train_docs, tok, "pretrain train", progress)
    val_ids = token_array(val_docs, tok, "pretrain val", progress)
    schedule = phases(p)

    torch.manual_seed(p.seed)
    gpt_config = base_gpt_config(p, tok.get_vocab_size())
    model = GPT(gpt_config).to(device).train()
    tok.save(str(out_dir / "tokenizer.json"))
    model.tokenizer_path = str(out_dir / "tokenizer.json")  # save_pretrained copies it: each phase folder is complete
    t0 = time.perf_counter()
    summaries, first_step = [], 0
    for ph in schedule:
        summaries.append(_run_phase(cfg, ph, model, train_ids, val_ids, out_dir / ph.name, first_step, progress))
        first_step += summaries[-1]["steps"]
    save_pretrained(model, out_dir)
    np.save(out_dir / SOURCE_VAL_FILE, np.asarray(val_ids))
    summary = {
        "val_loss": summaries[-1]["val_loss"],  # held-out loss at the last phase's length
        "val_loss_init": summaries[0]["val_loss_init"],
        "phases": summaries,
        "steps": sum(s["steps"] for s in summaries),
        "tokens": sum(s["tokens"] for s in summaries),
        "train_time_s": sum(s["train_time_s"] for s in summaries),
        "wall_time_s": time.perf_counter() - t0,  # of this process: a resumed build counts its own part only
        "params": sum(q.numel() for q in model.parameters()),
        "device": str(device),
        "dtype": dtype_label(pretrain_dtype(cfg)),
        "corpus_fingerprint": corpus.fingerprint,
        "source_val_docs": len(val_docs.docs),
        "source_val_tokens": len(val_ids),
        "torch_version": torch.__version__,
    }
    write_json_atomic(out_dir / "pretrain.json", summary)
    return summary


def _run_phase(
    cfg: Config,
    ph: Phase,
    model: GPT,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    work: Path,
    first_step: int,
    progress: bool,
) -> dict:
    """Train `model` in place through one phase, resuming from `work` (its checkpoint, or its finished weights);
    returns the phase's summary. Raises PretrainDiverged on a non-finite loss."""
    done = work / PHASE_DONE
    if done.is_file():  # finished by an earlier process: its weights are the start of the next phase
        model.load_state_dict(from_pretrained(work).state_dict())
        return json.loads(done.read_text(encoding="utf-8"))
    p, device = cfg.pretrain, next(model.parameters()).device
    plan = loop.plan_batches(ph.tokens, p.batch_tokens, p.micro_batch_tokens, ph.seq_len)
    settings = loop.Settings(  # every field given: the engine's own defaults are not the lab's
        lr=ph.lr,
        min_lr_ratio=PRETRAIN_MIN_LR_RATIO,
        warmup_fraction=PRETRAIN_WARMUP_FRACTION,
        weight_decay=p.weight_decay,
        grad_clip=PRETRAIN_GRAD_CLIP,
        amp_dtype=pretrain_dtype(cfg),
        compile=cfg.train.compile,
        log_every=max(1, plan.steps // 50),
        eval_every=0,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    sampler = TrainSampler(train_ids, ph.seq_len, plan.micro_seqs, seed=p.seed)
    xv, yv = val_windows(val_ids, ph.seq_len, PRETRAIN_EVAL_TOKENS)
    out = loop.train(
        model,
        lambda step, micro: sampler.batch(first_step + step, micro),  # one stream of windows across phases
        plan,
        settings,
        device=device,
        dist=DistInfo(rank=0, world_size=1, device=device, owns_group=False),
        val=(xv, yv),
        checkpoint=work / CHECKPOINT_FILE,
        resume=True,
        log=MetricsLog(work, config=cfg.to_dict()["pretrain"]),
        progress=progress,
        desc=f"pretrain base, {ph.name} ({ph.seq_len} tokens)",
    )
    if out.status != "ok":
        raise PretrainDiverged(
            f"pretraining the built-in base diverged (non-finite loss) at step {out.diverged_step} of {ph.name} "
            f"({ph.seq_len}-token sequences); lower {ph.lr_key} (now {ph.lr:g})."
        )
    summary = {
        "seq_len": ph.seq_len,
        "lr": ph.lr,
        "val_loss": out.val_curve[-1][1],
        "val_loss_init": out.val_curve[0][1],
        "steps": out.steps,
        "tokens": out.train_tokens,
        "train_time_s": out.train_time_s,
        "tokens_per_s": out.train_tokens / max(out.train_time_s, 1e-9),
    }
    save_pretrained(model, work)
    write_json_atomic(done, summary)  # last: the phase is done only once its weights are complete
    (work / CHECKPOINT_FILE).unlink(missing_ok=True)
    return summary
