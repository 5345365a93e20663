"""train.dtype: auto picks bf16 autocast on a CPU with bf16 units and float32 on one without (decided by the CPU's
flags, read by torch's cpuinfo); the choice reaches the result row and the built-in base's cache key; a float32 run
is what it was before frozen weights could be kept in bf16."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data import load_corpus
from data.cache import json_hash
from experiments.base import pretrain
from experiments.finetune import train as finetune_train
from experiments.finetune.train import train_run
from training import precision
from training.precision import amp_dtype, cpu_bf16_units, dtype_label

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, toy_corpora, run_workspace):
    """Toy corpora and one cache for the module: the toy float32 base is pretrained once."""
    root = tmp_path_factory.mktemp("precision")
    toy_corpora(root)
    with run_workspace(root):
        yield root


def _no_bf16_units(monkeypatch) -> None:
    """Play a CPU without bf16 matrix instructions (an AVX2 or AVX-512-without-BF16 part)."""
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)


def _amx(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")


def test_auto_follows_the_cpu_flags(monkeypatch):
    _amx(monkeypatch)
    assert amp_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AVX512-BF16")
    assert amp_dtype("auto", CPU) == torch.bfloat16
    _no_bf16_units(monkeypatch)
    assert amp_dtype("auto", CPU) is None  # float32, as before `auto` looked at the CPU
    assert amp_dtype("auto", CUDA) == torch.bfloat16  # CUDA does not ask the CPU


@pytest.mark.parametrize("units", [None, "AMX"])
def test_an_explicit_dtype_is_never_overridden(monkeypatch, units):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    assert amp_dtype("float32", CPU) is None
    assert amp_dtype("bfloat16", CPU) == torch.bfloat16
    assert amp_dtype("float16", CUDA) == torch.float16


def test_the_flag_reader_agrees_with_proc_cpuinfo():
    """On Linux/x86 the kernel's flag list says the same as torch's cpuinfo (what cpu_bf16_units reads)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), None)
    if flags is None:
        pytest.skip("no x86 flag list in /proc/cpuinfo on this OS/architecture")
    units = cpu_bf16_units()
    if "avx512_bf16" not in flags or not torch.backends.mkldnn.is_available():
        assert units is None
    else:
        assert units == ("AMX" if "amx_tile" in flags else "AVX512-BF16")


def test_dtype_labels():
    assert dtype_label(None) == "float32"
    assert dtype_label(torch.bfloat16) == "bfloat16 autocast"
    assert dtype_label(torch.float16) == "float16 autocast"


def test_base_key_holds_the_precision_and_a_float32_base_keeps_its_key(tmp, tiny_config, monkeypatch):
    """A bf16-pretrained base is never reused for float32 training or the other way round; the float32 key is the
    one caches held before precision joined it, so an existing float32 base is still found."""
    cfg32 = tiny_config(tmp)
    fp = load_corpus(cfg32.pretrain.corpus).fingerprint
    before = json_hash({"pretrain": cfg32.to_dict()["pretrain"], "corpus": fp})
    assert pretrain.base_key(cfg32, fp) == before
    key16 = pretrain.base_key(tiny_config(tmp, train={"dtype": "bfloat16"}), fp)
    assert key16 != before
    auto = tiny_config(tmp, train={"dtype": "auto"})
    _no_bf16_units(monkeypatch)
    assert pretrain.base_key(auto, fp) == before
    _amx(monkeypatch)
    assert pretrain.base_key(auto, fp) == key16


def test_auto_on_a_cpu_without_bf16_trains_in_float32_and_says_so(tmp, tiny_config, monkeypatch):
    """The row records what `auto` chose: float32 on a CPU reported without bf16 units, and the base it used is the
    float32 one (no second pretraining)."""
    _no_bf16_units(monkeypatch)
    r = train_run(
        tiny_config(tmp, train={"dtype": "auto", "tokens": 256 * 2}), tmp / "runs" / "auto_fp32", progress=False
    )
    assert r["status"] == "ok", r["error"]
    assert r["dtype"] == "float32"
    assert len(list((tmp / "cache" / "base").glob("*/model.safetensors"))) == 1


def test_auto_on_a_cpu_with_bf16_units_trains_in_bf16_and_pretrains_a_bf16_base(tmp, tiny_config, monkeypatch):
    _amx(monkeypatch)
    cfg = tiny_config(tmp, train={"dtype": "auto", "tokens": 256 * 2})
    r = train_run(cfg, tmp / "runs" / "auto_bf16", progress=False)
    assert r["status"] == "ok", r["error"]
    assert r["dtype"] == "bfloat16 autocast"
    base = tmp / "cache" / "base" / pretrain.base_key(cfg, load_corpus(cfg.pretrain.corpus).fingerprint)
    assert json.loads((base / "pretrain.json").read_text())["dtype"] == "bfloat16 autocast"
    # the adapter on disk stays float32 whatever the training precision
    tensors = load_file(str(tmp / "runs" / "auto_bf16" / "adapter" / "adapter_model.safetensors"))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["train_loss"]) for row in rows if "train_loss" in row]


def test_a_float32_run_is_unchanged_bit_for_bit(tmp, tiny_config, monkeypatch):
    """The same float32 run through the public API with the frozen-bf16 step taken out (the code path as it was)
    and with it in: the same losses, validation figures and adapter bits."""
    cfg = tiny_config(tmp, train={"tokens": 256 * 4})
    new = train_run(cfg, tmp / "runs" / "fp32_new", progress=False)
    monkeypatch.setattr(finetune_train, "keep_frozen_in", lambda model, dtype: 0)
    old = train_run(cfg, tmp / "runs" / "fp32_old", progress=False)
    assert new["status"] == old["status"] == "ok"
    assert new["dtype"] == old["dtype"] == "float32"
    assert _losses(tmp / "runs" / "fp32_new") == _losses(tmp / "runs" / "fp32_old") != []
    for key in ("val_loss", "base_val_loss", "best_val_loss", "source_val_loss"):
        assert new[key] == old[key], key
    a = load_file(str(tmp / "runs" / "fp32_new" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp / "runs" / "fp32_old" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
