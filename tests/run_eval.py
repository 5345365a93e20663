"""Shared by the tests that check a sweep's numbers: a run's validation loss recomputed outside the lab, by
transformers (and PEFT) or a plain forward pass in float64, on validation tokens joined and windowed here by hand.

Only the choice of validation documents (data.split_corpus) and the tokenizer a checkpoint folder carries
(data.load_tokenizer) are the lab's own; the joining, the windows, the model and the loss are not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from data import eot_id, load_corpus, load_tokenizer, split_corpus

# |row loss / loss recomputed here - 1|: the run evaluates in float32 with its own chunked loss, the reference in
# float64. Measured on CPU (Xeon, AMX) over the six losses of test_run_checkpoint (OPT, GPT-2) and test_model_hub
# (OPT by name): 2.1e-9 to 1.03e-7; the bound is ~3x the largest. Training moves them by 4e-4 to 3.5e-3 relative.
LOSS_RTOL = 3e-7


def val_windows_by_hand(folder: Path, data_dir: Path, val_fraction: float, seq_len: int, max_tokens: int):
    """The validation windows a run of `--data data_dir` on the checkpoint `folder` evaluates: each validation
    document's tokens followed by end-of-text, the first max_tokens + 1 of them cut into windows of seq_len that
    predict the next token. Returns (inputs, targets), each (n, seq_len)."""
    tok = load_tokenizer(folder)
    _, val = split_corpus(load_corpus(str(data_dir)), val_fraction)
    ids = [i for _, text in val.docs for i in (*tok.encode(text, add_special_tokens=False).ids, eot_id(tok))]
    n_pred = min(max_tokens, len(ids) - 1)
    assert n_pred % seq_len == 0, "chosen so that no window is padded"
    x = torch.tensor(ids[: n_pred + 1])
    return x[:-1].view(-1, seq_len), x[1:].view(-1, seq_len)


def mean_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], windows) -> float:
    """The mean next-token cross-entropy over every target of the windows, from a model's float64 logits."""
    x, y = windows
    with torch.no_grad():
        logits = logits_of(x).double()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
