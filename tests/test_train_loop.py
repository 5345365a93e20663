"""The training loop on a tiny GPT with synthetic batches: schedule, accumulation, divergence, resume, memory."""

import gc
import math

import pytest
import torch

from lora import LoRAConfig, inject_lora
from model import GPT, GPTConfig
from training import loop, memory
from training.distributed import DistInfo


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy shapes: one thread is faster than two, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CPU = torch.device("cpu")
ONE = DistInfo(rank=0, world_size=1, device=CPU, owns_group=False)
VOCAB, SEQ = 97, 16


def tiny_lora_model(dtype=torch.float32, lora_dropout=0.0, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_position_embeddings=SEQ))
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=lora_dropout, target_modules=["q_proj", "v_proj", "fc1"]))
    return model.to(dtype).train()


# A learnable stream: token t+1 = (3 t + 1) mod VOCAB with a little noise, so loss can fall fast.
_g = torch.Generator().manual_seed(1)
STREAM = torch.empty(20000, dtype=torch.long)
STREAM[0] = 5
for _i in range(1, len(STREAM)):
    STREAM[_i] = (3 * STREAM[_i - 1] + 1) % VOCAB
STREAM = torch.where(
    torch.rand(len(STREAM), generator=_g) < 0.05, torch.randint(0, VOCAB, (len(STREAM),), generator=_g), STREAM
)


def batch_fn(micro_seqs: int):
    """(step, micro) -> a fixed batch: the same (step, micro) always gives the same windows."""

    def get(step: int, micro: int):
        g = torch.Generator().manual_seed(10_000 * step + micro)
        starts = torch.randint(0, len(STREAM) - SEQ - 1, (micro_seqs,), generator=g)
        x = torch.stack([STREAM[s : s + SEQ] for s in starts])
        y = torch.stack([STREAM[s + 1 : s + SEQ + 1] for s in starts])
        return x, y

    return get


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_plan_holds_tokens_per_step_across_context_lengths():
    plans = [loop.plan_batches(300_000, 8192, 4096, T) for T in (256, 512, 1024, 2048)]
    assert {p.tokens_per_step for p in plans} == {8192}
    assert [p.micro_seqs for p in plans] == [16, 8, 4, 2]
    p = loop.plan_batches(1000, 100, 100, 4096)  # a sequence longer than the micro-batch: one sequence, one step
    assert (p.micro_seqs, p.accum, p.tokens_per_step) == (1, 1, 4096)
    assert loop.plan_batches(8192, 8192, 1024, 512, world_size=2).accum == 8
    assert loop.plan_batches(8192, 4096, 4096, 512, world_size=2).accum == 2  # rounded up to one per process


def test_lr_schedule_warmup_then_cosine_to_min():
    s = loop.Settings(lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1)
    lrs = [loop.lr_at(i, 100, s) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert loop.lr_at(0, 1, s) == pytest.approx(1.0)  # one step: no warmup, full lr


def test_loss_decreases_and_only_lora_trains():
    model = tiny_lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    plan = loop.BatchPlan(seq_len=SEQ, micro_seqs=8, accum=2, steps=30)
    xv, yv = batch_fn(32)(999, 0)
    out = loop.train(
        model,
        batch_fn(8),
        plan,
        loop.Settings(lr=5e-2, log_every=5),
        device=CPU,
        dist=ONE,
        val=(xv, yv),
        progress=False,
    )
    assert out.status == "ok" and out.steps == 30 and out.train_tokens == 30 * 2 * 8 * SEQ
    first, last = out.train_curve[0][1], out.train_curve[-1][1]
    assert last < first - 0.3, (first, last)
    assert [s for s, _ in out.val_curve] == [0, 30] and out.val_curve[1][1] < out.val_curve[0][1]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_a_known_val_before_is_recorded_at_step_0_instead_of_evaluated(monkeypatch):
    xv, yv = batch_fn(8)(999, 0)
    plan = loop.BatchPlan(seq_len=SEQ, micro_seqs=4, accum=1, steps=3)
    calls: list[float | None] = []
    real = loop.evaluate
    runs = {}
    for known in (None, 1.2345):
        monkeypatch.setattr(loop, "evaluate", lambda *a, known=known, **k: calls.append(known) or real(*a, **k))
        runs[known] = loop.train(
            tiny_lora_model(),
            batch_fn(4),
            plan,
            loop.Settings(lr=1e-2),
            device=CPU,
            dist=ONE,
            val=(xv, yv),
            val_before=known,
            progress=False,
        )
    assert calls == [None, None, 1.2345]  # before and after; after only
    computed, given = runs[None], runs[1.2345]
    assert given.val_curve[0] == [0, 1.2345] and computed.val_curve[0][1] != 1.2345
    assert given.val_curve[1] == computed.val_curve[1]  # training itself is untouched


def test_grad_accumulation_equals_one_big_batch_float64():
    """k micro-batches of m sequences == one micro-batch of k*m sequences, to float64 rounding."""
    big = batch_fn(8)

    def quarter(step, micro):  # the big batch's rows, two at a time
        x, y = big(step, 0)
        return x[2 * micro : 2 * micro + 2], y[2 * micro : 2 * micro + 2]

    settings = loop.Settings(lr=5e-3, grad_clip=0.5, weight_decay=0.1)
    results = []
    for fn, micro_seqs, accum in ((big, 8, 1), (quarter, 2, 4)):
        model = tiny_lora_model(torch.float64)
        out = loop.train(
            model, fn, loop.BatchPlan(SEQ, micro_seqs, accum, steps=5), settings, device=CPU, dist=ONE, progress=False
        )
        results.append((trainable(model), [loss for _, loss in out.train_curve]))
    (p1, c1), (p2, c2) = results
    assert c1 == pytest.approx(c2, rel=1e-12, abs=1e-12)
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(p1[n], tiny_lora_model(torch.float64).state_dict()[n]) for n in p1)


def test_nan_loss_stops_the_run_as_diverged_at_its_step():
    model = tiny_lora_model()
    calls = {"n": 0}
    real_loss = model.loss

    def poisoned(x, y):  # micro-batch 7 = step 4 (2 micro-batches per step) turns NaN
        calls["n"] += 1
        loss = real_loss(x, y)
        return loss * float("nan") if calls["n"] == 1 + 7 else loss  # +1: the memory-measuring pass

    model.loss = poisoned
    out = loop.train(
        model,
        batch_fn(4),
        loop.BatchPlan(SEQ, 4, 2, steps=10),
        loop.Settings(lr=1e-3),
        device=CPU,
        dist=ONE,
        progress=False,
    )
    assert out.status == "diverged" and out.diverged_step == 4 and out.steps == 3
    assert all(math.isfinite(loss) for _, loss in out.train_curve)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was not applied


def test_resume_continues_bit_identically(tmp_path, monkeypatch):
    """Straight N steps == k steps, interrupt, resume to N: same adapter tensors and loss curve (with LoRA dropout,
    so the RNG state has to come back too)."""
    plan = loop.BatchPlan(SEQ, 4, 2, steps=8)
    settings = loop.Settings(lr=5e-3, checkpoint_every=3)
    xv, yv = batch_fn(8)(999, 0)

    def run(ckpt, resume):
        model = tiny_lora_model(lora_dropout=0.2)
        out = loop.train(
            model,
            batch_fn(4),
            plan,
            settings,
            device=CPU,
            dist=ONE,
            val=(xv, yv),
            checkpoint=ckpt,
            resume=resume,
            progress=False,
        )
        return model, out

    straight_model, straight = run(tmp_path / "a.pt", resume=False)

    real_save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):  # the process is "killed" right after its second checkpoint (step 6)
        real_save(*args, **kwargs)
        if args[4]["step"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", resume=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed_model, resumed = run(tmp_path / "b.pt", resume=True)

    assert resumed.train_curve == straight.train_curve
    assert resumed.val_curve == straight.val_curve
    a, b = trainable(straight_model), trainable(resumed_model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_saved_for_backward_counts_activations_not_parameters():
    model = tiny_lora_model()
    x, y = batch_fn(4)(0, 0)
    saved = loop.measure_saved_bytes(model, x, y, CPU, None)
    # at least the (B, T, d) fp32 input of every LoRA layer, far less than counting every weight each time
    assert saved >= 3 * 2 * 4 * SEQ * 32 * 4
    doubled = loop.measure_saved_bytes(model, *batch_fn(8)(0, 0), CPU, None)
    assert 1.6 * saved < doubled < 2.4 * saved  # activations scale with the batch
    assert all(p.grad is None for p in model.parameters())
    peaks = memory.memory_peaks(CPU)
    assert peaks["peak_rss_bytes"] > 10 * 2**20 and peaks["peak_allocated_bytes"] is None


def test_loop_optimizer_and_autocast_follow_the_device(device, monkeypatch):
    """The loop's device branch: fused AdamW on CUDA (foreach on CPU), every forward (memory probe, training,
    evaluation) under autocast to the asked dtype on that device, fp32 adapters that learn, a frozen base."""
    made = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    model = tiny_lora_model().to(device)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    seen = []
    real_loss = model.loss

    def loss_seen(x, y):
        seen.append((x.device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)))
        return real_loss(x, y)

    model.loss = loss_seen
    xv, yv = batch_fn(32)(999, 0)
    out = loop.train(
        model,
        batch_fn(8),
        loop.BatchPlan(SEQ, 8, 1, steps=20),
        loop.Settings(lr=5e-2, amp_dtype=torch.bfloat16),
        device=device,
        dist=DistInfo(rank=0, world_size=1, device=device, owns_group=False),
        val=(xv, yv),
        progress=False,
    )
    assert [m["fused"] for m in made] == [device.type == "cuda"]
    assert len(seen) == 1 + 20 + 2 * 32 // 8  # the saved-bytes probe, 20 steps, 4 eval batches before and after
    assert set(seen) == {(device.type, True, torch.bfloat16)}
    assert out.status == "ok" and out.val_curve[-1][1] < out.val_curve[0][1] - 0.1, out.val_curve  # measured: -0.25
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is None, n  # fp32 masters, gradients freed each step
        else:
            assert torch.equal(p, frozen[n]), n


def test_memory_peaks_fill_the_device_keys_and_reset_per_run(device):
    """memory_peaks reports the device's figures (allocator peaks on CUDA, peak RSS on CPU) and reset_peaks
    restarts them from what is resident now, so each run's peak is its own and not the process's.

    Read against the memory in use while a block is alive, not against a figure taken before it: in a long test
    process other memory (an earlier test's garbage) may be freed at any moment, which lowers what is in use but
    can never lower a peak below what was in use."""
    gc.collect()  # an earlier test's garbage freed now, not between the readings below
    if not memory.reset_peaks(device):
        pytest.skip("this OS cannot reset a process's peak RSS (no /proc/self/clear_refs)")
    key = "peak_allocated_bytes" if device.type == "cuda" else "peak_rss_bytes"

    def in_use() -> int:
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else memory.rss_bytes()

    big = 256 * 2**20
    block = torch.ones(big // 4, device=device)  # written, so resident
    with_block = in_use()
    del block
    assert in_use() < with_block - 0.9 * big  # the block really left: the peak below is not just what is in use
    peaks = memory.memory_peaks(device)
    slack = 4 * 2**20  # Linux sums RSS from per-CPU counters that lag: VmHWM read 236 KiB under VmRSS here
    assert peaks[key] >= with_block - slack
    if device.type == "cuda":
        assert peaks["peak_reserved_bytes"] >= peaks[key] and peaks["peak_active_bytes"] >= big
        assert peaks["peak_rss_bytes"] is None
    else:
        assert peaks["peak_allocated_bytes"] is None and peaks["peak_reserved_bytes"] is None
    assert memory.reset_peaks(device)
    assert memory.memory_peaks(device)[key] < with_block - big / 2  # restarted from what is in use now
