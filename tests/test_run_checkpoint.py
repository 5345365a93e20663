"""`python -m experiments.run --base_model FOLDER --data DIR`, as the README tells a user to run it: a random tiny
OPT (with tokenizer.json) and GPT-2 (with vocab.json + merges.txt) saved by transformers, fine-tuned on their own
tokenizer, and the OPT adapter loaded by PEFT onto transformers' model."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import peft
import pytest
import torch
import transformers
from run_eval import LOSS_RTOL, mean_loss, val_windows_by_hand
from safetensors.torch import load_file

from data import load_corpus, train_bpe_tokenizer
from data.tokenizer import EOT

REPO = Path(__file__).resolve().parent.parent
VOCAB = 300
SEQ, EVAL_TOKENS, VAL_FRACTION = 64, 512, 0.25  # the runs' context, validation tokens and validation share


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fine-tuning folder of stdlib files, and a 300-token BPE trained on it (any tokenizer would do)."""
    root = tmp_path_factory.mktemp("ckpt")
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if 3_000 < p.stat().st_size < 20_000)
    (root / "finetune").mkdir()
    for f in files[:16]:
        shutil.copy(f, root / "finetune" / f.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLM_LORA_CACHE", str(root / "cache"))
        tok = train_bpe_tokenizer(load_corpus(str(root / "finetune")), VOCAB)
    env = dict(os.environ, SLM_LORA_CACHE=str(root / "cache"), PYTHONPATH=str(REPO))
    env.pop("WANDB_PROJECT", None)
    return root, tok, env


def run(root: Path, folder: Path, out: Path, env: dict) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "experiments/configs/abl_lora_rank.yaml",
        "--lora_rank",
        "4",
        "--base_model",
        str(folder),
        "--data",
        str(root / "finetune"),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        f"model.max_position_embeddings={SEQ}",
        "--set",
        "train.tokens=1024",
        "--set",
        "train.batch_tokens=512",
        "--set",
        "train.micro_batch_tokens=256",
        "--set",
        f"eval.max_tokens={EVAL_TOKENS}",
        "--set",
        f"data.val_fraction={VAL_FRACTION}",
        "--set",
        "train.dtype=float32",  # the losses are checked against float64 at float32's error (auto: bf16 on AMX)
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    return rows[0]


def test_own_opt_checkpoint(setup, tmp_path):
    root, tok, env = setup
    cfg = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(cfg).eval()
    folder = tmp_path / "opt"
    hf.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))

    row = run(root, folder, tmp_path / "out", env)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert row["total_params"] == n_hf + row["trainable_params"]
    assert row["trainable_params"] == 2 * 2 * 4 * (32 + 32)  # 2 layers x (q, v) x rank (in + out)
    assert row["lora_rank"] == 4 and row["base_fingerprint"]

    # The row's losses are transformers' (base) and PEFT's (base + the adapter the run saved) on the same tokens,
    # and its perplexities their exponentials. The adapter is PEFT's format: PeftModel reads it as it is.
    windows = val_windows_by_hand(folder, root / "finetune", VAL_FRACTION, SEQ, EVAL_TOKENS)
    base = mean_loss(lambda x: copy.deepcopy(hf).double()(x).logits, windows)
    adapter = tmp_path / "out" / row["run_dir"] / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["peft_type"] == "LORA"
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval().double()
    tuned = mean_loss(lambda x: peft_model(x).logits, windows)
    assert row["base_val_loss"] == pytest.approx(base, rel=LOSS_RTOL, abs=0)
    assert row["val_loss"] == pytest.approx(tuned, rel=LOSS_RTOL, abs=0)
    assert abs(tuned - base) > 100 * LOSS_RTOL * base  # training moved lora_B away from zero, measurably
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-12)
    assert row["base_val_ppl"] == pytest.approx(math.exp(row["base_val_loss"]), rel=1e-12)


def test_own_gpt2_checkpoint_with_vocab_and_merges(setup, tmp_path):
    root, tok, env = setup
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path / "gpt2"
    hf.save_pretrained(folder)
    tok.model.save(str(folder))  # vocab.json + merges.txt, as GPT-2 ships them
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOT}))
    assert not (folder / "tokenizer.json").exists()

    row = run(root, folder, tmp_path / "out", env)
    assert row["total_params"] == sum(p.numel() for p in hf.parameters()) + row["trainable_params"]

    # The row's losses are transformers' GPT-2 on the same tokens: as saved, then with the run's adapter merged by
    # hand into the fused c_attn (a Conv1D: (in, 3 * out), columns q | k | v) as W + scaling * B @ A.
    windows = val_windows_by_hand(folder, root / "finetune", VAL_FRACTION, SEQ, EVAL_TOKENS)
    tuned_hf = copy.deepcopy(hf).double()
    base = mean_loss(lambda x: tuned_hf(x).logits, windows)
    adapter = tmp_path / "out" / row["run_dir"] / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    scaling = saved["lora_alpha"] / (math.sqrt(saved["r"]) if saved["use_rslora"] else saved["r"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            layer, module = int(key.split(".layers.")[1].split(".")[0]), key.split(".lora_A.")[0].rsplit(".", 1)[1]
            delta = scaling * tensors[key.replace(".lora_A.", ".lora_B.")].double() @ a.double()  # (out, in)
            part = {"q_proj": 0, "k_proj": 1, "v_proj": 2}[module]
            tuned_hf.transformer.h[layer].attn.c_attn.weight[:, part * 32 : (part + 1) * 32] += delta.t()
    assert sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in tensors}) == ["q_proj", "v_proj"]
    tuned = mean_loss(lambda x: tuned_hf(x).logits, windows)
    assert row["base_val_loss"] == pytest.approx(base, rel=LOSS_RTOL, abs=0)
    assert row["val_loss"] == pytest.approx(tuned, rel=LOSS_RTOL, abs=0)
    assert abs(tuned - base) > 100 * LOSS_RTOL * base
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-12)


def test_checkpoint_without_tokenizer_fails_before_any_run(setup, tmp_path):
    root, _, env = setup
    folder = tmp_path / "opt"
    transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--lora_rank",
            "4",
            "--base_model",
            str(folder),
            "--data",
            str(root / "finetune"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no tokenizer.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()
