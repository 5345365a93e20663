"""Errors a sweep can know before any work (README, "Bad input fails fast"): each fails with exit code 2 and one
message, before a base is pretrained, text tokenized or a row written. In-process; the checks build models on the
meta device only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.run import main

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"
TM = str(CONFIGS / "abl_target_modules.yaml")


def refused(argv: list[str], tmp_path: Path, capsys, cache: Path) -> str:
    """Run the sweep; assert it stopped with exit 2 before any work and said so without a traceback."""
    out = tmp_path / "out"
    rc = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (cache / "base").exists()  # no row, no run folder, no pretraining
    return err


OPT_CONFIG = {
    "model_type": "opt",
    "vocab_size": 300,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "ffn_dim": 64,
    "max_position_embeddings": 64,
    "activation_function": "relu",
    "do_layer_norm_before": True,
    "word_embed_proj_dim": 16,  # OPT-350m style: project_in / project_out appear in the mapping
}


@pytest.fixture
def opt_folder(tmp_path, tiny_checkpoint):
    """A user's OPT folder: OPT's config.json, a real tokenizer, and weights that are garbage bytes, so a check
    that loaded them would fail; preflight reads config.json only."""
    folder = tiny_checkpoint(tmp_path / "opt")
    (folder / "config.json").write_text(json.dumps(OPT_CONFIG))
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    return folder


def test_target_modules_matching_nothing(tmp_path, capsys, isolated_cache):
    err = refused(["--config", TM, "--target_modules", "no_such_proj"], tmp_path, capsys, isolated_cache)
    assert "config error: --target_modules no_such_proj: lora.target_modules on" in err  # the input, as given
    assert "the built-in base" in err and "matched no module" in err and "layers.*.self_attn.q_proj" in err


def test_target_modules_matching_a_module_that_is_not_linear(tmp_path, capsys, isolated_cache):
    err = refused(["--config", TM, "--target_modules", "attn_norm"], tmp_path, capsys, isolated_cache)
    assert "'layers.0.attn_norm', a LayerNorm, but LoRA wraps nn.Linear only" in err


def test_target_modules_of_a_users_folder_come_from_its_config_json(tmp_path, capsys, isolated_cache, opt_folder):
    argv = ["--config", TM, "--base_model", str(opt_folder), "--set", "model.max_position_embeddings=64"]
    err = refused([*argv, "--target_modules", "fc3"], tmp_path, capsys, isolated_cache)
    assert f"{opt_folder} (opt)" in err and "matched no module" in err and "project_in" in err  # OPT's mapping
    assert main([*argv, "--target_modules", "fc1", "--dry-run", "--out", str(tmp_path / "o")]) == 0


def _no_config(f: Path) -> None:
    (f / "config.json").unlink()


def _bert(f: Path) -> None:
    (f / "config.json").write_text(json.dumps({**OPT_CONFIG, "model_type": "bert"}))


def _bad_config(f: Path) -> None:
    (f / "config.json").write_text('{"model_type": "opt", ')


def _bad_tokenizer(f: Path) -> None:
    (f / "tokenizer.json").write_text("{ not json")


def _no_weights(f: Path) -> None:
    (f / "model.safetensors").unlink()


@pytest.mark.parametrize(
    "damage,needles",
    [
        (_no_config, ["has no config.json"]),
        (_bert, ["model_type 'bert' is not supported", "opt, gpt2, llama, qwen2, mistral"]),
        (_bad_config, ["config.json cannot be read as JSON"]),
        (_bad_tokenizer, ["tokenizer.json cannot be read as a tokenizer"]),
        (_no_weights, ["has no weights", "model.safetensors", "pytorch_model.bin"]),
    ],
    ids=["no-config", "unsupported-type", "unreadable-config", "unreadable-tokenizer", "no-weights"],
)
def test_base_folder_problems(tmp_path, capsys, isolated_cache, opt_folder, damage, needles):
    damage(opt_folder)
    err = refused(["--config", TM, "--base_model", str(opt_folder)], tmp_path, capsys, isolated_cache)
    assert str(opt_folder) in err and all(n in err for n in needles), err


@pytest.mark.parametrize("base", ["builtin", "opt"])
def test_learned_positions_shorter_than_the_context(tmp_path, capsys, isolated_cache, opt_folder, base):
    if base == "builtin":
        argv = ["--set", "pretrain.position_embedding=learned", "--set", "pretrain.seq_len=128"]
        argv += ["--set", "pretrain.long_seq_len=256"]  # the table ends at the longest pretraining phase
        needle = "the 256-position learned position table of the built-in base"
        fix = "pretrain longer sequences (pretrain.long_seq_len)"
    else:
        argv = ["--base_model", str(opt_folder)]
        needle, fix = f"the 64-position learned position table of {opt_folder} (opt)", "use at most 64."
    err = refused(["--config", TM, *argv, "--max_position_embeddings", "512"], tmp_path, capsys, isolated_cache)
    assert "model.max_position_embeddings=512 is longer than" in err and needle in err and fix in err


@pytest.mark.filterwarnings("ignore:corpus .* has one document")  # on purpose: its lines are split
@pytest.mark.parametrize("split", ["training", "validation"])
def test_text_shorter_than_one_context_window(tmp_path, capsys, isolated_cache, tiny_checkpoint, split):
    """Needs tokens: checked once the text is tokenized, still before any run starts or any row is written."""
    base = tiny_checkpoint(tmp_path / "base")
    lines = 3 if split == "training" else 400  # validation: the last 1% of one document's characters
    (tmp_path / "text.py").write_text("".join(f"x_{i} = {i}\n" for i in range(lines)))
    argv = [
        "--config",
        TM,
        "--target_modules",
        "q_proj",
        "--base_model",
        str(base),
        "--data",
        str(tmp_path / "text.py"),
    ]
    argv += ["--set", "data.val_fraction=0.01", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the {split} split of data.finetune" in err and "fewer than one context window of 512 tokens" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.jsonl").exists() and not (tmp_path / "out" / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys, isolated_cache):
    err = refused(["--config", TM, "--set", "train.device=cuda"], tmp_path, capsys, isolated_cache)
    assert "train.device is cuda, but torch" in err and "sees no CUDA device" in err and "train.device=auto" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--max_position_embeddings", "100000"], "'model.max_position_embeddings' (100000) is longer than"),
        (
            ["--set", "train.batch_tokens=1", "--set", "train.micro_batch_tokens=1"],
            "'model.max_position_embeddings' (512) is longer than train.batch_tokens (1)",
        ),
    ],
    ids=["context-100000", "batch_tokens-1"],
)
def test_sequence_longer_than_batch_tokens_is_refused(tmp_path, capsys, isolated_cache, argv, needle):
    err = refused(argv, tmp_path, capsys, isolated_cache)
    assert needle in err and "would train" in err


def test_step_size_that_differs_from_batch_tokens_is_stated_in_the_plan(tmp_path, capsys, isolated_cache):
    assert main(["--max_position_embeddings", "3000", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "note: context_length model.max_position_embeddings=3000: 9,000 tokens per optimizer step, " in printed
    assert "not train.batch_tokens=8,192" in printed


def test_out_that_is_a_file(tmp_path, capsys, isolated_cache):
    (tmp_path / "out").write_text("a file")
    rc = main(["--config", TM, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a folder" in err and (tmp_path / "out").read_text() == "a file"


def test_out_that_cannot_be_written(tmp_path, capsys, isolated_cache, unwritable):
    locked = unwritable(tmp_path / "locked")
    rc = main(["--config", TM, "--out", str(locked / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot write in {locked}" in err and "Traceback" not in err
    assert not (locked / "out").exists()
