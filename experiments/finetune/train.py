"""One LoRA fine-tuning run: a validated Config in, a trained adapter and one flat result row out.

    python -m experiments.finetune --config-json run/config.json --run-dir run/ [--resume] [--group G] [--name N]
                                   [--threads T] [--no-progress]
    torchrun --nproc_per_node 2 -m experiments.finetune ...       # DDP: same global batch, same numbers

The sweep runner starts one such process per run, so a run's peak memory is its own. Once training starts,
whatever happens, the process exits 0 and run_dir/result.json says what happened: ok, diverged (with the step),
oom or failed. Before that: exit 2 for a missing or invalid --config-json, 1 when another process holds the run
folder (experiments.finetune.locks.RunLock), 130 on Ctrl-C (quietly: the sweep says it in one line).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from data import Corpus, TrainSampler, load_corpus, load_tokenizer, split_corpus, split_tune, token_array, val_windows
from data.cache import write_json_atomic
from experiments.base.evals import cached_base_loss, eval_key
from experiments.base.pretrain import SOURCE_VAL_FILE, base_fingerprint, ensure_base, pretrain_split
from experiments.config.config import Config, ConfigError, from_dict
from experiments.finetune.locks import RunLock, exit_with_parent
from experiments.finetune.row import RESULT_FILE, RESULT_KEYS
from lora import LoRAConfig, count_parameters, inject_lora, save_adapter
from lora.inject import fold_names
from model import GPTConfig, from_pretrained
from training import distributed, loop, memory
from training.checkpoint import CHECKPOINT_FILE
from training.distributed import device_name
from training.metrics import MetricsLog, perplexity
from training.precision import amp_dtype, dtype_label, keep_frozen_in


def _set_dropout(model: nn.Module, p: float) -> None:
    """model.dropout of the config replaces the checkpoint's own (residual and attention dropout). Call before
    inject_lora, whose own dropout is lora.dropout."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "attn_dropout") and isinstance(m.attn_dropout, float):
            m.attn_dropout = p


def check_context(cfg: Config, gcfg: GPTConfig, label: str) -> None:
    """The run's context must fit the base's position table (GPTConfig.max_seq_len; rope/alibi/none have none).
    Preflight calls it on the base's config before any work, the run again on the model it loaded."""
    seq, limit = cfg.model.max_position_embeddings, gcfg.max_seq_len
    if limit is not None and seq > limit:
        fix = (
            ", or pretrain longer sequences (pretrain.long_seq_len), or use pretrain.position_embedding=rope"
            if cfg.model.base == "builtin"
            else ""
        )
        raise ConfigError(
            f"model.max_position_embeddings={seq} is longer than the {limit}-position {gcfg.position_embedding} "
            f"position table of {label}; use at most {limit}{fix}."
        )


def train_run(
    cfg: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    group: str | None = None,
    run_name: str | None = None,
    progress: bool = True,
) -> dict:
    """One LoRA fine-tuning run. Never raises for diverged/oom/failed runs: returns them as a status.

    Returns (and rank 0 writes atomically to run_dir/result.json) a flat dict with the keys of RESULT_KEYS.
    """
    run_dir = Path(run_dir)
    dist = distributed.setup(cfg.train.device)
    device = dist.device
    dtype = amp_dtype(cfg.train.dtype, device)
    result: dict = dict.fromkeys(RESULT_KEYS)
    result.update(
        status="failed",
        device=device_name(device),
        torch_version=torch.__version__,
        world_size=dist.world_size,
        dtype=dtype_label(dtype),
    )
    log = None
    try:
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(
            run_dir,
            config=cfg.to_dict(),
            group=group,
            name=run_name or run_dir.name,
            enabled=dist.is_main,
            resume=resume,
        )
        result.update(_fine_tune(cfg, run_dir, dist, dtype, resume, log, progress, run_name or run_dir.name))
    except torch.cuda.OutOfMemoryError as e:
        result.update(status="oom", error=f"CUDA out of memory: {str(e).splitlines()[0]}")
    except Exception as e:  # a failed run must not stop the sweep; the traceback goes to stderr
        traceback.print_exc()
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
    result.update(memory.memory_peaks(device))
    if dist.is_main:
        write_json_atomic(run_dir / RESULT_FILE, result)
    if log is not None:
        log.finish(result)
    distributed.teardown(dist)
    return result


class RunTokens(NamedTuple):
    """A run's token arrays, all under the base's tokenizer."""

    corpus: Corpus  # the fine-tuning corpus
    train: np.ndarray
    val: np.ndarray
    source: np.ndarray | None  # the source set of forgetting; None: the run has none
    tune: np.ndarray | None  # the tune split an lr grid chooses by (data.tune_fraction > 0); None otherwise


def finetune_splits(cfg: Config) -> tuple[Corpus, Corpus, Corpus, Corpus | None]:
    """The fine-tuning corpus and its (train, validation, tune) documents; tune is None without data.tune_fraction.
    Reads text only: the sweep's preflight calls it too, so unusable text fails before any tokenizing."""
    corpus = load_corpus(cfg.data.finetune, cfg.data.text_field, builtin="finetune")
    train_docs, val_docs = split_corpus(corpus, cfg.data.val_fraction)
    if cfg.data.tune_fraction <= 0:
        return corpus, train_docs, val_docs, None
    # held out of training only: validation stays what it is without a grid
    train_docs, tune_docs = split_tune(train_docs, cfg.data.val_fraction, cfg.data.tune_fraction)
    return corpus, train_docs, val_docs, tune_docs


def finetune_tokens(cfg: Config, base_dir: str | Path, progress: bool = True) -> RunTokens:
    """The fine-tuning corpus, its (train, validation) token arrays and the source set, from the token cache
    (tokenized on first use). The sweep calls this once before its runs, so no run's peak memory carries the
    tokenizer's working set.

    The source set is eval.source_data if given ("builtin": the built-in base's held-out pretraining documents, the
    Python standard library, tokenized with this base's tokenizer, so any base's forgetting is measured on the same
    text), else the base folder's own held-out pretraining tokens (SOURCE_VAL_FILE, which the built-in base
    carries), else None."""
    tok = load_tokenizer(base_dir)
    corpus, train_docs, val_docs, tune_docs = finetune_splits(cfg)
    tune = None if tune_docs is None else token_array(tune_docs, tok, "finetune tune", progress)
    train_ids = token_array(train_docs, tok, "finetune train", progress)
    val_ids = token_array(val_docs, tok, "finetune val", progress)
    source = None
    if cfg.eval.source_data == "builtin":
        held_out = pretrain_split(load_corpus("builtin", builtin="pretrain"))[1]
        source = token_array(held_out, tok, "source", progress)
    elif cfg.eval.source_data is not None:
        source = token_array(load_corpus(cfg.eval.source_data, cfg.data.text_field), tok, "source", progress)
    elif (Path(base_dir) / SOURCE_VAL_FILE).is_file():
        source = np.load(Path(base_dir) / SOURCE_VAL_FILE, mmap_mode="r")
    return RunTokens(corpus, train_ids, val_ids, source, tune)


def _fine_tune(
    cfg: Config,
    run_dir: Path,
    dist: distributed.DistInfo,
    dtype: torch.dtype | None,
    resume: bool,
    log: MetricsLog,
    progress: bool,
    desc: str,
) -> dict:
    device, seq_len = dist.device, cfg.model.max_position_embeddings
    # 1. The base model and its tokenizer (rank 0 builds the cached base first; the others then read it).
    if dist.is_main:
        base_dir = ensure_base(cfg, progress=progress)
    if dist.world_size > 1:
        torch.distributed.barrier()
    if not dist.is_main:
        base_dir = ensure_base(cfg, progress=False)
    model = from_pretrained(base_dir)
    check_context(cfg, model.config, str(base_dir))

    # 2. The fine-tuning text, tokenized with the base's tokenizer; validation split by document.
    corpus, train_ids, val_ids, source_ids, tune_ids = finetune_tokens(cfg, base_dir, progress)
    plan = loop.plan_batches(
        cfg.train.tokens, cfg.train.batch_tokens, cfg.train.micro_batch_tokens, seq_len, dist.world_size
    )
    # Every process draws from the same global stream; the loop hands each its share of micro-batch indices.
    sampler = TrainSampler(train_ids, seq_len, plan.micro_seqs, seed=cfg.train.seed)
    xv, yv = val_windows(val_ids, seq_len, cfg.eval.max_tokens)
    # The source set: the same tokens for every run of a study (eval.source_max_tokens), at this run's context.
    source = val_windows(source_ids, seq_len, cfg.eval.source_max_tokens) if source_ids is not None else None

    # 3. LoRA: injection freezes every base weight; the seed fixes A's init (same on every process).
    _set_dropout(model, cfg.model.dropout)
    torch.manual_seed(cfg.train.seed)
    lcfg = cfg.lora
    adapted = inject_lora(
        model,
        LoRAConfig(
            rank=lcfg.rank,
            alpha=lcfg.resolved_alpha(),
            dropout=lcfg.dropout,
            target_modules=list(lcfg.target_modules),
            use_rslora=lcfg.alpha_policy == "rslora",
            init=lcfg.init,
        ),
    )
    keep_frozen_in(model, dtype)  # bf16 autocast: frozen weights stored in bf16, not re-cast on every call
    model.gradient_checkpointing = cfg.train.activation_checkpointing
    model.to(device).train()
    trainable, total = count_parameters(model)

    def loss_on(windows: tuple[torch.Tensor, torch.Tensor]) -> float:
        return loop.evaluate(model, windows[0], windows[1], plan.micro_seqs, device, dtype, dist)

    fingerprint = base_fingerprint(Path(base_dir))

    def before(windows: tuple[torch.Tensor, torch.Tensor]) -> float:
        """The base model's loss on `windows` (LoRA's B is zero: the model is still the base), once per study."""
        if dist.world_size > 1:
            return loss_on(windows)
        setting = {"batch": plan.micro_seqs, "dtype": str(dtype), "device": device.type}
        return cached_base_loss(eval_key(Path(base_dir), fingerprint, windows, setting), lambda: loss_on(windows))

    base_source_loss = before(source) if source is not None else None
    val_before = None if resume else before((xv, yv))  # a resumed run has it in its checkpoint

    # 4. Train. Peaks count from here: the model and data are resident, the rest is the run's own.
    memory.reset_peaks(device)
    t = cfg.train
    settings = loop.Settings(
        lr=t.lr,
        min_lr_ratio=t.min_lr_ratio,
        warmup_fraction=t.warmup_fraction,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        amp_dtype=dtype,
        compile=t.compile,
        log_every=t.log_every,
        eval_every=cfg.eval.every_steps,
        checkpoint_every=t.checkpoint_every,
    )
    out = loop.train(
        model,
        sampler.batch,
        plan,
        settings,
        device=device,
        dist=dist,
        val=(xv, yv),
        val_before=val_before,
        checkpoint=run_dir / CHECKPOINT_FILE,
        resume=resume,
        log=log,
        progress=progress,
        desc=desc,
    )

    # 5. The adapter and the numbers.
    if dist.is_main and out.status == "ok":
        save_adapter(model, run_dir / "adapter")
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    base_loss = out.val_curve[0][1] if out.val_curve and out.val_curve[0][0] == 0 else None
    tuned = [loss for step, loss in out.val_curve if step > 0]
    final = tuned[-1] if out.status == "ok" and tuned else None
    best = min(tuned) if tuned else None
    source_final = loss_on(source) if source is not None and out.status == "ok" else None
    tune_loss = None
    if tune_ids is not None and out.status == "ok":  # what an lr grid chooses by; validation is never looked at
        xt, yt = val_windows(tune_ids, seq_len, cfg.eval.max_tokens)
        tune_loss = loss_on((xt, yt))
    base_source_ppl, source_ppl = perplexity(base_source_loss), perplexity(source_final)
    return {
        "status": out.status,
        "error": None,
        "diverged_step": out.diverged_step,
        "val_loss": final,
        "val_ppl": perplexity(final),
        "best_val_loss": best,
        "best_val_ppl": perplexity(best),
        "base_val_loss": base_loss,
        "base_val_ppl": perplexity(base_loss),
        "source_val_loss": source_final,
        "source_val_ppl": source_ppl,
        "base_source_val_ppl": base_source_ppl,
        "tune_loss": tune_loss,
        "forgetting": (
            source_ppl / base_source_ppl - 1 if source_ppl is not None and base_source_ppl is not None else None
        ),
        "train_tokens": out.train_tokens,
        "steps": out.steps,
        "train_time_s": out.train_time_s,
        "tokens_per_s": out.train_tokens / out.train_time_s if out.train_time_s > 0 else None,
        "trainable_params": trainable,
        "total_params": total,
        "adapted_modules": ", ".join(fold_names(adapted)),
        "saved_for_backward_bytes": out.saved_for_backward_bytes,
        "corpus_fingerprint": corpus.fingerprint,
        "base_fingerprint": fingerprint,
    }


def _read_config(path: Path) -> Config:
    """A run's config.json; every way it can be wrong is a ConfigError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config-json {path}: no such file.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config-json {path}: cannot be read as JSON ({e}).") from None
    return from_dict(data, source=str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-json", required=True, type=Path, help="a run's full config (Config.to_dict() as JSON)")
    ap.add_argument("--run-dir", required=True, type=Path, help="where metrics, adapter and result.json go")
    ap.add_argument("--resume", action="store_true", help="continue from run-dir/checkpoint.pt if there is one")
    ap.add_argument("--group", default=None, help="W&B group (the ablation's name)")
    ap.add_argument("--name", default=None, help="run name (W&B and the progress bar)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--parent-pid", type=int, default=None, help="the sweep that started this run: end when it ends, share its lock"
    )
    ap.add_argument("--threads", type=int, help="torch CPU threads (a sweep running N at once gives each its share)")
    args = ap.parse_args(argv)
    # The sweep stops a run with SIGINT: take it even if inherited blocked (a Ray worker's child) or ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.threads:
        torch.set_num_threads(args.threads)  # before train_run, whose result records it in `device`
    try:
        if args.parent_pid is not None:
            exit_with_parent(args.parent_pid)
        cfg = _read_config(args.config_json)
        args.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(args.run_dir)
        if args.parent_pid is not None:  # the sweep that started us owns the folder; we share its hold
            held = lock.join()
        elif int(os.environ.get("RANK", "0")) == 0:
            held = lock.claim()
        else:  # under torchrun rank 0 owns the run for its group; the others meet it in init_process_group
            held = True
        if not held:
            print(f"error: {args.run_dir} is being trained by another process (pid {lock.owner()}).", file=sys.stderr)
            return 1
        result = train_run(
            cfg, args.run_dir, resume=args.resume, group=args.group, run_name=args.name, progress=not args.no_progress
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    summary = {k: result[k] for k in ("status", "val_ppl", "base_val_ppl", "tokens_per_s")}
    print(json.dumps(summary), file=sys.stderr)
    return 0
