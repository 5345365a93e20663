"""Model names through the Hugging Face cache: a tiny random OPT and GPT-2 saved by transformers (with tokenizer
files) are put into a private cache in the layout huggingface_hub writes, resolved by name with HF_HUB_OFFLINE=1,
loaded, and swept by `python -m experiments.run --base_model org/name`. No test touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import huggingface_hub as hub
import peft
import pytest
import torch
import transformers
from run_eval import LOSS_RTOL, mean_loss, val_windows_by_hand
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import model.hub
from data.tokenizer import EOT
from experiments.config.config import ConfigError, load_config, with_value, with_values
from experiments.run import main as run_main
from model import CheckpointNotFoundError, from_pretrained, resolve_checkpoint

REPO = Path(__file__).resolve().parent.parent
VOCAB = 300


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Callable[[str, Path], Path]:
    """An empty offline Hugging Face cache under HF_HOME=tmp, and `put(repo_id, folder)`, which stores a folder's
    files as that repo the way huggingface_hub does (blobs/<sha256>, snapshots/<commit>/ of relative symlinks,
    refs/main) and returns the snapshot folder. The variables are set for subprocesses; huggingface_hub reads them
    at import, so its constants are patched for this process too."""
    home = tmp_path / "hf_home"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, folder: Path) -> Path:
        repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir()
        for f in sorted(folder.iterdir()):
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    return put


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE (any text encodes to ids < VOCAB), trained in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def resolve(name):\n    return cache[name]\n" * 20], trainer=trainer)
    return tok


def tiny_checkpoint(kind: str, folder: Path) -> torch.nn.Module:
    """A random tiny OPT (tokenizer.json + tokenizer_config.json) or GPT-2 (vocab.json + merges.txt), as the Hub
    serves them; returns transformers' model."""
    torch.manual_seed(0)
    if kind == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
        hf = transformers.OPTForCausalLM(cfg).eval()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), eos_token=EOT).save_pretrained(folder)
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        hf = transformers.GPT2LMHeadModel(cfg).eval()
        folder.mkdir(parents=True, exist_ok=True)
        tiny_tokenizer().model.save(str(folder))
        (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOT}))
    with torch.no_grad():  # random biases and LayerNorms too: a mapping mistake cannot hide behind zeros
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    hf.save_pretrained(folder)
    return hf


# max|our logits - transformers' logits| on these random tiny models (logits up to ~1.2), measured on CPU (Xeon, AMX)
# for both kinds over 3 inputs: 3.0e-7 in float32 and 5.0e-16 in float64; the bounds are ~3-4x that.
FLOAT32_ATOL = 1e-6
FLOAT64_ATOL = 2e-15


def assert_same_logits(ours: torch.nn.Module, hf: torch.nn.Module, x: torch.Tensor) -> None:
    """Our GPT and transformers' model give the same logits: in float32, then in float64 (both converted in place)."""
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=FLOAT32_ATOL)
        torch.testing.assert_close(ours.double()(x), hf.double()(x).logits, rtol=0, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_name_resolves_offline_to_the_snapshot_transformers_loads(hf_cache, tmp_path, kind):
    name = f"tiny-org/tiny-{kind}"
    hf = tiny_checkpoint(kind, tmp_path / "saved")
    snapshot = hf_cache(name, tmp_path / "saved")
    cached = hub.scan_cache_dir(hub.constants.HF_HUB_CACHE).repos  # huggingface_hub itself reads the layout
    assert [(r.repo_id, r.nb_files) for r in cached] == [(name, len(list(snapshot.iterdir())))]

    assert resolve_checkpoint(name) == snapshot
    ours = from_pretrained(name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(name).eval()  # the same name, the same cache
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, hf(x).logits, rtol=0, atol=0)
    assert_same_logits(ours, hf, x)
    tokenizer_file = snapshot / "tokenizer.json"
    assert ours.tokenizer_path == (str(tokenizer_file) if tokenizer_file.exists() else None)


def test_bin_only_snapshot(hf_cache, tmp_path):
    """Older repos (facebook/opt-125m) hold pytorch_model.bin and no safetensors."""
    hf = tiny_checkpoint("opt", tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "saved" / "pytorch_model.bin")
    snapshot = hf_cache("tiny-org/tiny-opt", tmp_path / "saved")
    assert resolve_checkpoint("tiny-org/tiny-opt") == snapshot
    assert_same_logits(from_pretrained("tiny-org/tiny-opt"), hf, torch.randint(0, VOCAB, (1, 16)))


def test_local_folder_wins_over_a_name_and_the_hub_is_not_asked(hf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_checkpoint("opt", Path("tiny-org/tiny-opt"))  # a folder that is also shaped like a name; the cache is empty
    assert resolve_checkpoint("tiny-org/tiny-opt") == Path("tiny-org/tiny-opt")
    assert resolve_checkpoint(tmp_path / "tiny-org" / "tiny-opt") == tmp_path / "tiny-org" / "tiny-opt"
    assert from_pretrained("tiny-org/tiny-opt").config.n_layer == 2


def test_name_missing_from_the_offline_cache_says_where_it_looked_and_how_to_download(hf_cache, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    hf_cache("tiny-org/other", tmp_path / "other")  # the cache exists and holds another repo
    with pytest.raises(CheckpointNotFoundError) as err:
        from_pretrained("facebook/opt-125m")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "facebook/opt-125m is not a local folder" in msg and "HF_HUB_OFFLINE=1" in msg
    assert str(tmp_path / "hf_home" / "hub") in msg
    assert "`hf download facebook/opt-125m`" in msg
    assert msg.endswith("HF_HUB_CACHE or HF_HOME choose another cache folder.")  # the other way out


def test_unreachable_hub_falls_back_to_the_cache(hf_cache, tmp_path, monkeypatch):
    """Offline mode off, but the Hub does not answer (a closed local port stands in for it): a cached name still
    resolves, and a name that is not cached is the clear error, with the reason."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    tiny_checkpoint("opt", tmp_path / "saved")
    snapshot = hf_cache("tiny-org/tiny-opt", tmp_path / "saved")
    assert resolve_checkpoint("tiny-org/tiny-opt") == snapshot
    with pytest.raises(CheckpointNotFoundError, match=r"the Hub could not be reached \(ConnectError") as err:
        resolve_checkpoint("tiny-org/missing")
    assert str(tmp_path / "hf_home" / "hub") in str(err.value) and "`hf download tiny-org/missing`" in str(err.value)


# Files of two repos on the Hub (abridged): weights in several formats, docs, and what from_pretrained reads.
HUB_FILES = {
    "facebook/opt-125m": ".gitattributes README.md config.json generation_config.json flax_model.msgpack tf_model.h5 "
    "pytorch_model.bin merges.txt vocab.json special_tokens_map.json tokenizer_config.json",
    "openai-community/gpt2": "README.md 64.tflite config.json flax_model.msgpack model.safetensors onnx/config.json "
    "onnx/decoder_model.onnx pytorch_model.bin rust_model.ot tf_model.h5 merges.txt vocab.json tokenizer.json "
    "tokenizer_config.json",
}


@pytest.mark.parametrize(
    "name, wanted",
    [
        ("facebook/opt-125m", "config.json pytorch_model.bin merges.txt vocab.json special_tokens_map.json"),
        ("openai-community/gpt2", "config.json model.safetensors merges.txt vocab.json tokenizer.json"),
    ],
)
def test_a_download_fetches_only_what_from_pretrained_reads(tmp_path, monkeypatch, name, wanted):
    """Online, snapshot_download gets allow_patterns; huggingface_hub's own filter applies them to the repo's files
    here: safetensors when the repo has them, else .bin, never TF / Flax / ONNX copies or subfolders."""
    fetched: list[str] = []

    def download(repo_id: str, allow_patterns: list[str], local_files_only: bool) -> str:
        assert not local_files_only
        files = list(hub.utils.filter_repo_objects(HUB_FILES[repo_id].split(), allow_patterns=allow_patterns))
        for f in files:
            (tmp_path / f).touch()
        fetched.extend(files)
        return str(tmp_path)

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model.hub, "snapshot_download", download)
    assert resolve_checkpoint(name) == tmp_path
    assert set(fetched) == {*wanted.split(), "tokenizer_config.json"}


class NoSuchRepo(BaseHTTPRequestHandler):
    """The Hub's answer to a repo it does not have (or that is private and the request is not logged in)."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(monkeypatch) -> Iterator[None]:
    """Offline mode off, and the Hub endpoint a local server that knows no repo."""
    server = HTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    yield
    server.shutdown()
    server.server_close()


def test_name_the_hub_does_not_know(hf_cache, fake_hub):
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint("tiny-org/typo")
    assert str(err.value) == (
        "tiny-org/typo is not a local folder, and the Hugging Face Hub has no model of that name (a private or gated "
        "one needs `hf auth login` first)."
    )


@pytest.mark.parametrize("text", ["no/such/folder", "opt-125m", "bad name/with space", "config.json"])
def test_neither_a_folder_nor_a_name(hf_cache, tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    Path("config.json").write_text("{}")  # an existing file is not a checkpoint folder either
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(text)
    assert not isinstance(err.value, CheckpointNotFoundError)
    assert str(err.value) == (
        f"{text!r}: no such folder, nor a Hugging Face model name like facebook/opt-125m, nor a .gguf file or a named "
        "base (smollm2-135m). Give the folder of a checkpoint (config.json + weights), an org/name from the Hub, a "
        "GGUF file, or a named base."
    )


def test_config_resolves_a_name_in_model_base_once_to_its_snapshot(hf_cache, tmp_path):
    """A YAML, --set or swept model.base name becomes the snapshot folder when the config is built, before any work."""
    tiny_checkpoint("opt", tmp_path / "saved")
    snapshot = hf_cache("tiny-org/tiny-opt", tmp_path / "saved")
    cfg = with_values(load_config(), [("model.base", "tiny-org/tiny-opt", "--set model.base=tiny-org/tiny-opt")])
    assert cfg.model.base == str(snapshot)
    assert with_value(load_config(), "model.base", "tiny-org/tiny-opt").model.base == str(snapshot)
    with pytest.raises(
        ConfigError, match=r"^ablation value 'tiny-org/gone': 'model.base': tiny-org/gone is not a local"
    ):
        with_value(load_config(), "model.base", "tiny-org/gone", source="ablation value 'tiny-org/gone'")


def sweep(args: list[str], out: Path) -> subprocess.CompletedProcess:
    """`python -m experiments.run` in a subprocess with this test's environment (HF_HOME, HF_HUB_OFFLINE=1, the
    private SLM_LORA_CACHE): huggingface_hub reads the variables at import, as it does for a user."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("WANDB_PROJECT", None)
    cmd = [sys.executable, "-m", "experiments.run", *args, "--out", str(out), "--no-progress"]
    return subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=300)


def test_quick_sweep_by_name_from_the_offline_cache(hf_cache, isolated_cache, tmp_path):
    tiny_checkpoint("opt", tmp_path / "saved")
    snapshot = hf_cache("tiny-org/tiny-opt", tmp_path / "saved")
    data = tmp_path / "finetune"
    data.mkdir()
    stdlib = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if 3_000 < p.stat().st_size < 20_000)
    for f in stdlib[:8]:
        shutil.copy(f, data / f.name)
    out = tmp_path / "out"
    settings = ["model.max_position_embeddings=64", "train.tokens=1024", "train.batch_tokens=512"]
    settings += ["train.micro_batch_tokens=256", "eval.max_tokens=512", "data.val_fraction=0.25"]
    settings += ["train.dtype=float32"]  # the losses are checked against float64 at float32's error (auto: bf16 on AMX)
    done = sweep(
        ["--quick", "--config", "experiments/configs/abl_lora_rank.yaml", "--lora_rank", "4", "--data", str(data)]
        + ["--base_model", "tiny-org/tiny-opt", *(a for s in settings for a in ("--set", s))],
        out,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["status"], r["lora_rank"]) for r in rows] == [("ok", 4)]
    run_config = json.loads((out / rows[0]["run_dir"] / "config.json").read_text())
    assert run_config["model"]["base"] == str(snapshot)  # the run used the folder the name resolved to
    assert rows[0]["trainable_params"] == 2 * 2 * 4 * (32 + 32)
    # The losses are transformers' own on the snapshot's weights: before (the base) and with the run's adapter (PEFT).
    windows = val_windows_by_hand(snapshot, data, 0.25, 64, 512)
    hf = transformers.AutoModelForCausalLM.from_pretrained("tiny-org/tiny-opt").eval().double()
    base = mean_loss(lambda x: hf(x).logits, windows)
    tuned_model = peft.PeftModel.from_pretrained(hf, str(out / rows[0]["run_dir"] / "adapter")).eval().double()
    tuned = mean_loss(lambda x: tuned_model(x).logits, windows)
    assert rows[0]["base_val_loss"] == pytest.approx(base, rel=LOSS_RTOL, abs=0)
    assert rows[0]["val_loss"] == pytest.approx(tuned, rel=LOSS_RTOL, abs=0)
    assert abs(tuned - base) > 100 * LOSS_RTOL * base  # the adapter was trained: lora_B moved away from zero


def test_sweep_by_a_name_missing_from_the_offline_cache_stops_before_any_work(hf_cache, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(["--quick", "--lora_rank", "4", "--base_model", "facebook/opt-125m", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: --base_model facebook/opt-125m: facebook/opt-125m is not a local folder")
    assert str(tmp_path / "hf_home" / "hub") in err and "`hf download facebook/opt-125m`" in err
    assert not out.exists()
