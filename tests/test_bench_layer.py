"""bench.layer on a tiny shape (CPU): every implementation checked against the naive one, then timed; its JSON."""

import json

import pytest
import torch

from bench.layer import build, check, main
from training.distributed import device_name

TINY = ["--tokens", "64", "--dims", "32", "--ranks", "4", "--warmup", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """main(--threads 1) sets torch's thread count for the process; give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_bench_writes_every_implementation(tmp_path, dtype):
    meta = main([*TINY, "--dtype", dtype, "--out", str(tmp_path / "layer.json")])
    assert json.loads((tmp_path / "layer.json").read_text()) == json.loads(json.dumps(meta))
    assert meta["device"] == device_name(torch.device("cpu")) and meta["dtype"] == dtype and meta["steps"] == 20
    (row,) = meta["results"]
    assert (row["tokens"], row["d"], row["rank"]) == (64, 32, 4)
    assert set(row["median_ms"]) == {"floor", "naive", "ours", "peft"} and min(row["median_ms"].values()) > 0
    assert row["x_floor"]["floor"] == 1.0 and row["x_peft"]["peft"] == 1.0
    assert row["x_floor"]["ours"] == pytest.approx(row["median_ms"]["ours"] / row["median_ms"]["floor"])


def test_a_wrong_implementation_is_caught_before_timing():
    torch.manual_seed(0)
    impls = build(32, 4, "cpu", torch.float32)
    x = torch.randn(64, 32, requires_grad=True)
    g = torch.randn(64, 32)
    check(impls, x, g, autocast=False)
    impls["ours"].scaling *= 1.01  # a 1 % error in the low-rank term
    with pytest.raises(AssertionError, match="ours: tensor 0 differs from naive"):
        check(impls, x, g, autocast=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--dtype", "float16"], "CUDA-only"),
        (["--steps", "5"], "--steps must be >= 20"),
    ],
)
def test_bad_flags_fail_before_any_work(args, message):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=message):
        main([*TINY, *args])
