"""Batches: random training windows that are a pure function of (seed, step, micro-batch), and validation windows
that predict the same tokens whatever the context length.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100  # targets that carry no loss (the padded tail of the last validation window)


class TrainSampler:
    """Random windows of seq_len + 1 tokens. No iterator state: resuming at step s is calling `batch(s, ...)`.

    Micro-batch g of step s holds the windows drawn by a generator seeded with (seed, s, g), so the batches of a
    step do not depend on how processes share them: under DDP each process asks for its own global indices g.
    """

    def __init__(self, ids: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if ids.ndim != 1 or len(ids) < seq_len + 1:
            raise ValueError(
                f"need a 1-D token array of at least seq_len + 1 = {seq_len + 1} tokens, got shape "
                f"{tuple(ids.shape)}. Use more training text or a shorter context."
            )
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}.")
        self.ids, self.seq_len, self.batch_size, self.seed = ids, seq_len, batch_size, seed

    def offsets(self, step: int, micro: int = 0) -> np.ndarray:
        """(batch_size,) start positions of the windows of global micro-batch `micro` at `step`."""
        rng = np.random.default_rng([self.seed, step, micro])
        return rng.integers(0, len(self.ids) - self.seq_len, size=self.batch_size)  # last start: len - seq_len - 1

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64; targets are the inputs shifted by one token."""
        idx = self.offsets(step, micro)[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        w = torch.from_numpy(self.ids[idx].astype(np.int64))  # (B, T+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def val_windows(ids: np.ndarray, seq_len: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation windows that predict exactly tokens ids[1 : P + 1], P = min(max_tokens, len(ids) - 1), once each.

    Window i: inputs ids[i*T : (i+1)*T], targets ids[i*T+1 : (i+1)*T+1] (consecutive windows overlap by one token),
    so every seq_len predicts the same P tokens and per-token losses compare across context lengths. The last window
    is padded when T does not divide P: its extra targets are IGNORE_INDEX (-100) and its extra inputs a copy of the
    last real token; causal attention keeps them from touching the real predictions. With P a multiple of T (the
    default 65536 and T in 256..2048) nothing is padded. Average a loss over windows weighted by (targets != -100).
    Returns (n, seq_len) int64 inputs and targets, n = ceil(P / T).
    """
    if seq_len < 1 or max_tokens < 1:
        raise ValueError(f"seq_len and max_tokens must be >= 1, got {seq_len} and {max_tokens}.")
    n_pred = min(max_tokens, len(ids) - 1)
    if n_pred < 1:
        raise ValueError(
            f"the validation split has {len(ids)} tokens; at least 2 are needed. Raise "
            "data.val_fraction or give more documents."
        )
    n = -(-n_pred // seq_len)
    x = np.asarray(ids[: n_pred + 1], dtype=np.int64)  # (P+1,)
    inputs = np.full(n * seq_len, x[n_pred - 1], dtype=np.int64)
    targets = np.full(n * seq_len, IGNORE_INDEX, dtype=np.int64)
    inputs[:n_pred], targets[:n_pred] = x[:-1], x[1:]
    return torch.from_numpy(inputs).view(n, seq_len), torch.from_numpy(targets).view(n, seq_len)
