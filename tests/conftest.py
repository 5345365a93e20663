"""Fixtures shared by the whole suite: per-test seeding, a private cache folder, a tiny GPT, and the devices.

CI has 2 cores and no GPU; every test is deterministic and single-process unless it says otherwise. Tests that
take the `device` fixture run once per device: on CPU always, on CUDA when torch sees one (skipped otherwise).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data import EOT
from experiments.config.config import Config, from_dict
from model import GPT, GPTConfig, save_pretrained

REPO = Path(__file__).resolve().parent.parent

TINY_GPT = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_position_embeddings=16)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_a_terminal_gives_it() -> Iterator[None]:
    """Tests that press Ctrl-C (SIGINT) on a sweep or a run start it as a terminal would. A shell starts a background
    job (`pytest ... &`, nohup, a CI step's subshell) with SIGINT ignored, every child inherits that, and Python
    then installs no KeyboardInterrupt handler: the sweep under test would ignore the test's Ctrl-C. The suite's
    own disposition is given back at the end."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so its data does not depend on which tests ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private cache folder (SLM_LORA_CACHE) for this test: nothing is read from or left in ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SLM_LORA_CACHE", str(path))
    return path


@pytest.fixture
def tiny_gpt() -> Callable[..., GPT]:
    """A factory of small random GPTs in eval mode: `tiny_gpt("alibi", max_position_embeddings=32)`."""

    def make(kind: str = "rope", **overrides) -> GPT:
        torch.manual_seed(0)
        return GPT(GPTConfig(**{**TINY_GPT, "position_embedding": kind, **overrides})).eval()

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Callable[..., Path]:
    """Write a checkpoint folder as a user brings one (config.json, model.safetensors, a byte-level BPE
    tokenizer.json) with a tiny random GPT: `tiny_checkpoint(folder, position_embedding="learned")`."""

    def make(folder: Path, **overrides) -> Path:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator([f"def {a}({b}):\n    return {b}\n" for a in WORDS for b in WORDS], trainer=trainer)
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**TINY_GPT, "vocab_size": tok.get_vocab_size(), **overrides}))
        save_pretrained(model, folder)
        tok.save(str(folder / "tokenizer.json"))
        return folder

    return make


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """The test runs on CPU, and again on CUDA when there is a CUDA device."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    return torch.device(request.param)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: runs on a CUDA device; bench/gpu_check.sh runs `pytest -m cuda`")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the `device` fixture's CUDA cases `cuda` (CUDA-only tests carry the mark themselves), so that
    `pytest -m cuda` selects exactly the GPU checks: none of their CPU twins, nor CPU tests that mention CUDA."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


# ----------------------------------------------------------------------------- toy corpora and config for runs

WORDS = ["alpha", "beta", "gamma", "delta", "value", "index", "total", "count", "items", "result"]


def _write_corpus(root: Path, style: str, n_docs: int = 24, lines: int = 40, seed: int = 0) -> Path:
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


def _tiny_config(tmp: Path, **sections) -> Config:
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
            "dtype": "float32",  # the reference precision, whatever bf16 units the test machine has (auto would pick)
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
            "long_seq_len": 64,  # phase 2 of the length schedule: a few steps at twice the length
            "long_tokens": 512 * 4,
            "long_lr": 5e-3,
        },
    }
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return from_dict(data, source="test")


def _toy_corpora(tmp: Path) -> None:
    """tmp/pt (plain) and tmp/ft (with docstrings): the toy pretraining and fine-tuning corpora."""
    _write_corpus(tmp / "pt", "plain", seed=1)
    _write_corpus(tmp / "ft", "doc", seed=2)


@pytest.fixture(scope="session")
def toy_corpora() -> Callable[[Path], None]:
    """Write the toy corpora of `tiny_config` under a folder: `toy_corpora(tmp)`."""
    return _toy_corpora


@contextmanager
def _run_workspace(root: Path) -> Iterator[Path]:
    """For in-process runs on the toy corpora under `root`: the cache there (SLM_LORA_CACHE), no W&B, and one torch
    thread (toy shapes: faster than two, and immune to a busy machine); all restored on exit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLM_LORA_CACHE", str(root / "cache"))
        mp.delenv("WANDB_PROJECT", raising=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield root
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_workspace() -> Callable[[Path], Iterator[Path]]:
    """`with run_workspace(root): ...` in a module fixture whose tests train on the toy corpora under root."""
    return _run_workspace


def _stdlib_workspace(root: Path) -> dict[str, str]:
    """root/pretrain and root/finetune: two disjoint sets of real stdlib modules (3-25 kB), for sweeps that run
    `python -m experiments.run` in a subprocess; returns that subprocess's environment (cache under root)."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if 3_000 < p.stat().st_size < 25_000)
    for name, chosen in (("pretrain", files[:24]), ("finetune", files[24:40])):
        (root / name).mkdir()
        for f in chosen:
            shutil.copy(f, root / name / f.name)
    env = dict(os.environ, SLM_LORA_CACHE=str(root / "cache"), PYTHONPATH=str(REPO))
    env.pop("WANDB_PROJECT", None)
    return env


@pytest.fixture(scope="session")
def stdlib_workspace() -> Callable[[Path], dict[str, str]]:
    """Real corpora and a subprocess environment under a folder: `env = stdlib_workspace(root)`."""
    return _stdlib_workspace


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    """A full config at toy scale over `toy_corpora(tmp)`: `tiny_config(tmp, train={"tokens": 4096})`."""
    return _tiny_config


def can_write(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.fixture
def unwritable():
    """Make a folder refuse writes, for this user too: chmod a-w (which root ignores), else the immutable
    attribute (chattr +i, which root may set), else a link to /proc, where nobody creates files. Undone after."""
    immutable: list[Path] = []
    locked: list[Path] = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True)
        folder.chmod(0o555)
        locked.append(folder)
        if can_write(folder) and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            immutable.append(folder)
        if can_write(folder):
            folder.rmdir()
            folder.symlink_to("/proc")
        assert not can_write(folder)
        return folder

    yield make
    for folder in immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    for folder in locked:
        if not folder.is_symlink():
            folder.chmod(0o755)
