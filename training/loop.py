"""The training loop, shared by LoRA fine-tuning and base-model pretraining.

Read top to bottom: plan the batches from a token budget, build AdamW over the trainable parameters, then per
optimizer step: set the learning rate (linear warmup, cosine decay), run the gradient-accumulation micro-batches
under autocast, check the loss is finite, clip, step; evaluate, log and checkpoint at their intervals.
Which parameters train is decided before the loop (LoRA injection freezes the base); the loop just obeys
`requires_grad`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from data import IGNORE_INDEX
from training import memory
from training.checkpoint import DamagedCheckpoint, load_checkpoint, save_checkpoint, set_aside
from training.distributed import DistInfo, all_reduce_sum
from training.metrics import MetricsLog, perplexity

# (step, global micro-batch index) -> (x, y), both (micro_seqs, seq_len) int64 token ids, y = x shifted by one.
BatchFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BatchPlan:
    """How a token budget becomes optimizer steps. Tokens per step are held fixed across an ablation; at longer
    contexts fewer sequences make up a micro-batch."""

    seq_len: int
    micro_seqs: int  # sequences per forward/backward
    accum: int  # micro-batches per optimizer step, over all processes
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.accum * self.micro_seqs * self.seq_len

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def plan_batches(
    tokens: int, batch_tokens: int, micro_batch_tokens: int, seq_len: int, world_size: int = 1
) -> BatchPlan:
    micro_seqs = max(1, micro_batch_tokens // seq_len)
    accum = max(1, round(batch_tokens / (micro_seqs * seq_len)))
    if world_size > 1:  # the global micro-batches are split evenly across processes
        accum = max(world_size, round(accum / world_size) * world_size)
    steps = max(1, round(tokens / (accum * micro_seqs * seq_len)))
    return BatchPlan(seq_len, micro_seqs, accum, steps)


@dataclass
class Settings:
    """Optimizer and bookkeeping knobs of one loop. The defaults serve direct use of the engine (tests, benchmarks);
    the lab passes every field (from `train:` for fine-tuning, from `pretrain:` and experiments.base.pretrain's
    schedule constants for the base), so nothing relies on these matching experiments/configs/defaults.yaml."""

    lr: float
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: plain float32
    compile: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate before training and at the end only
    checkpoint_every: int = 0  # 0: no checkpoints


def lr_at(step: int, steps: int, s: Settings) -> float:
    """Linear warmup over the first warmup_fraction of steps, then cosine decay to lr * min_lr_ratio at the last."""
    warmup = round(s.warmup_fraction * steps)
    if step < warmup:
        return s.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    min_lr = s.lr * s.min_lr_ratio
    return min_lr + (s.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Outcome:
    """What the loop reports back. Curves are [step, value] pairs; step 0 of `val_curve` is before training."""

    status: str = "ok"  # "ok" | "diverged"
    diverged_step: int | None = None
    steps: int = 0
    train_tokens: int = 0
    train_time_s: float = 0.0
    saved_for_backward_bytes: int = 0
    train_curve: list = field(default_factory=list)
    val_curve: list = field(default_factory=list)


class _LossOf(nn.Module):
    """`forward(x, y)` = the model's memory-lean mean cross-entropy, so DDP and torch.compile wrap the loss
    (DDP hooks only fire through `forward`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class _Stopwatch:
    """Training wall time with evaluation and checkpointing left out; syncs CUDA so queued work is counted."""

    def __init__(self, device: torch.device, elapsed: float = 0.0) -> None:
        self.device, self.elapsed, self._t0 = device, elapsed, None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    xv: torch.Tensor,
    yv: torch.Tensor,
    batch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    dist: DistInfo,
) -> float:
    """Mean cross-entropy per predicted token over the validation windows xv, yv: (N, seq_len), targets of -100
    (padding) carry no loss. Windows are split across processes and the per-token sums added up, so the figure
    does not depend on the number of processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, predicted tokens]
    mine = torch.arange(dist.rank, xv.shape[0], dist.world_size)
    for i in range(0, len(mine), batch):
        idx = mine[i : i + batch]
        x, y = xv[idx].to(device), yv[idx].to(device)
        n = (y != IGNORE_INDEX).sum()
        with _autocast(device, amp_dtype):
            loss = model.loss(x, y)  # mean over the n predicted tokens
        totals[0] += torch.where(n > 0, loss.double() * n, 0.0)
        totals[1] += n
    all_reduce_sum(totals, dist)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


def measure_saved_bytes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None
) -> int:
    """Activation bytes one micro-batch saves for backward (parameters and buffers excluded). An extra eager
    forward outside the timed loop: autograd saves its tensors in the forward, so no backward is run (on a 135M
    model that backward was a third of a short run); dropping the loss frees the graph. RNG and gradients are left
    as they were."""
    resident = [*model.parameters(), *model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with memory.count_saved_for_backward(exclude=resident) as counter, _autocast(device, amp_dtype):
            model.loss(x.to(device), y.to(device))  # the graph, and what it saved, go when the loss does
    return counter["bytes"]


def _resume_state(
    checkpoint: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler, dist: DistInfo
) -> dict | None:
    """The loop state to resume from, or None to start fresh: no checkpoint, or a damaged one, which is set aside
    (by rank 0; every rank reads the same file, so all start fresh together)."""
    if not checkpoint.exists():
        return None
    try:
        return load_checkpoint(checkpoint, model, opt, scaler)
    except DamagedCheckpoint as e:
        if dist.is_main:
            moved = set_aside(checkpoint)
            print(f"warning: {e}; moved it to {moved.name} and starting this run from step 0.", file=sys.stderr)
        return None


def train(
    model: nn.Module,
    get_batch: BatchFn,
    plan: BatchPlan,
    s: Settings,
    *,
    device: torch.device,
    dist: DistInfo,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    val_before: float | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    log: MetricsLog | None = None,
    progress: bool = True,
    desc: str = "train",
) -> Outcome:
    """Train `model` (already on `device`) in place over `plan.steps` optimizer steps. `val_before`: the loss on
    `val` before training, when the caller knows it already; it is recorded at step 0 instead of evaluated."""
    out = Outcome()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: inject LoRA (or unfreeze weights) before training.")
    # Weight decay on matrices only (LoRA A/B, and base weights when pretraining); never on biases or norms.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if s.amp_dtype == torch.float16 else None

    loss_module: nn.Module = _LossOf(model)
    ddp = None
    if dist.world_size > 1:
        # find_unused_parameters=False: every trainable parameter takes part in every forward.
        ddp = loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_fn = torch.compile(loss_module) if s.compile else loss_module
    accum_local = plan.accum // dist.world_size
    eval_batch = plan.micro_seqs

    start = 0
    state = _resume_state(checkpoint, model, opt, scaler, dist) if resume and checkpoint is not None else None
    if state is not None:
        if state["plan"] != asdict(plan):
            raise ValueError(
                f"{checkpoint} was written for batches {state['plan']}, this run plans {asdict(plan)}: "
                "the config changed. Delete the checkpoint or drop --resume."
            )
        start, out.train_time_s = state["step"], state["train_time_s"]
        out.train_curve, out.val_curve = state["train_curve"], state["val_curve"]
    if log is not None:
        log.truncate_after(start)  # drop what an interrupted process logged after its last checkpoint

    x0, y0 = get_batch(start, dist.rank * accum_local)
    out.saved_for_backward_bytes = measure_saved_bytes(model, x0, y0, device, s.amp_dtype)

    def run_eval(step: int, known: float | None = None) -> None:
        if val is None:
            return
        loss = known if known is not None else evaluate(model, val[0], val[1], eval_batch, device, s.amp_dtype, dist)
        out.val_curve.append([step, loss])
        if log is not None:
            log.log(
                {"step": step, "tokens": step * plan.tokens_per_step, "val_loss": loss, "val_ppl": perplexity(loss)}
            )

    if start == 0:
        if log is not None:  # the batch plan actually used (tokens per step may differ from the asked batch_tokens)
            log.log(
                {
                    "step": 0,
                    "tokens_per_step": plan.tokens_per_step,
                    "micro_seqs": plan.micro_seqs,
                    "accum": plan.accum,
                    "steps": plan.steps,
                    "seq_len": plan.seq_len,
                }
            )
        run_eval(0, val_before)  # the base model: LoRA's B starts at zero, so this is the model before fine-tuning

    resumed_time = out.train_time_s  # training time of earlier processes of this run
    clock = _Stopwatch(device, resumed_time)
    bar = tqdm(
        total=plan.steps,
        initial=start,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=not (progress and dist.is_main),
    )
    window: list[float] = []  # step losses since the last log line
    clock.start()
    for step in range(start, plan.steps):
        lr = lr_at(step, plan.steps, s)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for j in range(accum_local):
            x, y = get_batch(step, dist.rank * accum_local + j)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP: all-reduce gradients on the last micro-batch only.
            sync = ddp.no_sync() if ddp is not None and j < accum_local - 1 else contextlib.nullcontext()
            with sync:
                with _autocast(device, s.amp_dtype):
                    loss = step_fn(x, y)  # mean over this micro-batch's tokens
                scaled = loss / accum_local
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach()
        # One host sync per optimizer step: it catches divergence at the step it happens (and keeps every rank
        # agreeing to stop), and it costs one wait per `accum` forward/backward passes of thousands of tokens,
        # far below 1% of a step even on a GPU; per micro-batch it would stall the launch queue `accum` times.
        step_loss = all_reduce_sum(loss_sum, dist).item() / plan.accum
        if not math.isfinite(step_loss):
            out.status, out.diverged_step = "diverged", step + 1
            if checkpoint is not None and dist.is_main:  # a retry starts fresh, never from the way to divergence
                checkpoint.unlink(missing_ok=True)
            if log is not None:
                log.log({"step": step + 1, "tokens": (step + 1) * plan.tokens_per_step, "train_loss": step_loss})
            break
        if scaler is not None:
            scaler.unscale_(opt)
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

        done = step + 1
        out.train_curve.append([done, step_loss])
        window.append(step_loss)
        bar.update(1)
        is_last = done == plan.steps
        if done % s.log_every == 0 or is_last:
            clock.stop()
            tok_s = (done - start) * plan.tokens_per_step / max(clock.elapsed - resumed_time, 1e-9)
            mean_loss = sum(window) / len(window)
            window = []
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
            if log is not None:
                log.log(
                    {
                        "step": done,
                        "tokens": done * plan.tokens_per_step,
                        "train_loss": mean_loss,
                        "lr": lr,
                        "tokens_per_s": tok_s,
                    }
                )
            clock.start()
        if is_last or (s.eval_every and done % s.eval_every == 0):
            clock.stop()
            run_eval(done)
            clock.start()
        if checkpoint is not None and s.checkpoint_every and done % s.checkpoint_every == 0 and not is_last:
            clock.stop()
            if dist.is_main:
                save_checkpoint(
                    checkpoint,
                    model,
                    opt,
                    scaler,
                    {
                        "step": done,
                        "plan": asdict(plan),
                        "train_time_s": clock.elapsed,
                        "train_curve": out.train_curve,
                        "val_curve": out.val_curve,
                    },
                )
            clock.start()
    clock.stop()
    bar.close()
    out.steps = len(out.train_curve)
    out.train_tokens = out.steps * plan.tokens_per_step
    out.train_time_s = clock.elapsed
    return out
