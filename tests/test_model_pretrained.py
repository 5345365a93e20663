"""from_pretrained against transformers' own OPT and GPT-2 (random tiny models, saved locally), and our own
save_pretrained round trip."""

import json
import pickle
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig, from_pretrained, save_pretrained
from model.pretrained import WEIGHT_FILES, has_weights, read_config


def randomize(module: torch.nn.Module) -> None:
    """Random values everywhere (biases and LayerNorms too), so a mapping mistake cannot hide behind zeros."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tiny_opt(**kw):
    cfg = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=40,
        word_embed_proj_dim=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    cfg.update(kw)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg)).eval()
    randomize(hf)
    return hf


def tiny_gpt2(**kw):
    cfg = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    randomize(hf)
    return hf


# Measured on CPU (torch 2.13, transformers 5.24), worst over 10 random seeds of each tiny model of this file:
# max|ours - transformers| is 3.6e-7 in float32 (either model is itself 3-5e-7 from its float64 logits, which are
# of size ~1: float32 rounding) and 7.8e-16 in float64. The bounds are ~3x and ~13x those figures; a mapping
# mistake (a transposed Conv1D, a missing offset or bias) moves logits by 1e-2 or more.
FLOAT32_ATOL = 1e-6
FLOAT64_ATOL = 1e-14


def assert_same_logits(hf, folder, device: torch.device | str = "cpu", T: int = 40) -> None:
    """Our import of `folder` against transformers' model `hf` (saved there), on `device`: in float32, the dtype
    users run, and in float64, where only a mapping error could leave a difference. Leaves hf in float64."""
    x = torch.randint(0, 97, (2, T), device=device)
    for dtype, atol in ((torch.float32, FLOAT32_ATOL), (torch.float64, FLOAT64_ATOL)):
        ours = from_pretrained(folder, dtype=dtype).to(device)
        hf.to(device, dtype)
        with torch.no_grad():
            diff = (hf(x).logits - ours(x)).abs().max().item()
        assert diff <= atol, f"{dtype}: max|ours - transformers| = {diff:.2e} > {atol:.0e}"
    assert ours.num_parameters() == hf.num_parameters()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"do_layer_norm_before": False},
        {"word_embed_proj_dim": 16},
        {"do_layer_norm_before": False, "word_embed_proj_dim": 16, "activation_function": "gelu"},
        {"enable_bias": False, "tie_word_embeddings": False, "_remove_final_layer_norm": True},
    ],
    ids=["opt-125m-like", "post-LN", "project_in_out", "opt-350m-like", "no-bias-untied-no-final-norm"],
)
def test_opt_parity(tmp_path, kw, device):
    hf = tiny_opt(**kw)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    cfg = ours.config
    assert cfg.position_offset == 2 and cfg.pre_norm == kw.get("do_layer_norm_before", True)
    assert (ours.project_in is not None) == ("word_embed_proj_dim" in kw)
    assert cfg.word_embed_proj_dim == kw.get("word_embed_proj_dim")  # tiny_opt's own equals hidden_size: None
    assert ours.tokenizer_path is None and not ours.training and ours.hf_module_prefix == "model.decoder."
    assert_same_logits(hf, tmp_path, device)


@pytest.mark.parametrize(
    "kw",
    [{}, {"n_inner": 48, "activation_function": "relu", "layer_norm_epsilon": 1e-3, "tie_word_embeddings": False}],
    ids=["gpt2-like", "n_inner-relu-eps-untied"],
)
def test_gpt2_parity(tmp_path, kw, device):
    hf = tiny_gpt2(**kw)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    cfg = ours.config
    assert ours.hf_module_prefix == ""  # GPT-2's module names differ from ours: no prefix maps them
    assert cfg.activation == ("relu" if kw else "gelu_tanh") and cfg.d_ff == kw.get("n_inner", 4 * 32)
    assert_same_logits(hf, tmp_path, device)


@pytest.mark.parametrize("which", ["opt", "gpt2"])
def test_missing_optional_keys_take_transformers_defaults(tmp_path, which):
    """An older or hand-written config.json that lists only the shape: every other field takes the default that
    transformers' own config class gives it, so both libraries build the same model."""
    shape = {
        "opt": ["vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads"],
        "gpt2": ["vocab_size", "n_embd", "n_layer", "n_head"],
    }[which]
    (tiny_opt() if which == "opt" else tiny_gpt2()).save_pretrained(tmp_path)
    full = json.loads((tmp_path / "config.json").read_text())
    minimal = {k: full[k] for k in shape + ["max_position_embeddings" if which == "opt" else "n_positions"]}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": which, **minimal}))
    ours = from_pretrained(tmp_path).config
    if which == "opt":
        ref = transformers.OPTConfig(**minimal)
        want = (ref.dropout, ref.attention_dropout, ref.enable_bias, ref.tie_word_embeddings, ref.do_layer_norm_before)
        want += (ref.do_layer_norm_before and not ref._remove_final_layer_norm, ref.activation_function, 1e-5)
    else:
        ref = transformers.GPT2Config(**minimal)
        want = (ref.resid_pdrop, ref.attn_pdrop, True, ref.tie_word_embeddings, True, True, ref.activation_function)
        want += (ref.layer_norm_epsilon,)
    got = (ours.dropout, ours.attn_dropout, ours.bias, ours.tie_embeddings, ours.pre_norm, ours.final_norm)
    got += ({"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}[ours.activation], ours.layer_norm_eps)
    assert got == want


@pytest.mark.parametrize("names", ["gpt2", "generic"])
def test_gpt2_config_fields_are_read_under_either_name(tmp_path, names):
    """transformers' GPT2Config also takes hidden_size, num_hidden_layers, num_attention_heads and
    max_position_embeddings (its attribute_map), so a hand-written config.json may use them. Every value differs
    from our defaults and from each other (dropout 0.05 vs attention 0.2), so a field read from the wrong key, or
    not read, shows."""
    keys = {
        "gpt2": ("n_embd", "n_layer", "n_head", "n_positions"),
        "generic": ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"),
    }[names]
    shape = dict(zip(keys, (24, 3, 2, 33)))
    hf = {"vocab_size": 97, **shape, "resid_pdrop": 0.05, "attn_pdrop": 0.2, "bos_token_id": 0, "eos_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **hf}))
    model_type, ours = read_config(tmp_path)
    ref = transformers.GPT2Config(**hf)
    want = (ref.n_embd, ref.n_layer, ref.n_head, ref.n_positions, 4 * ref.n_embd, ref.resid_pdrop, ref.attn_pdrop)
    got = (ours.d_model, ours.n_layer, ours.n_head, ours.max_position_embeddings, ours.d_ff, ours.dropout)
    got += (ours.attn_dropout,)
    assert model_type == "gpt2" and got == want == (24, 3, 2, 33, 96, 0.05, 0.2)
    del hf["attn_pdrop"]  # absent: transformers' own default (0.1), not the residual dropout given
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **hf}))
    assert read_config(tmp_path)[1].attn_dropout == transformers.GPT2Config(**hf).attn_pdrop == 0.1


def test_opt_config_fields_reach_ours(tmp_path):
    """Every shape and dropout field of an OPT config.json, each unlike our default and unlike the others."""
    hf = dict(vocab_size=97, hidden_size=24, num_hidden_layers=3, ffn_dim=40, num_attention_heads=2)
    hf.update(max_position_embeddings=33, dropout=0.05, attention_dropout=0.2, bos_token_id=0, eos_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", **hf}))
    model_type, ours = read_config(tmp_path)
    ref = transformers.OPTConfig(**hf)
    want = (ref.hidden_size, ref.num_hidden_layers, ref.ffn_dim, ref.num_attention_heads, ref.max_position_embeddings)
    want += (ref.dropout, ref.attention_dropout)
    got = (ours.d_model, ours.n_layer, ours.d_ff, ours.n_head, ours.max_position_embeddings, ours.dropout)
    got += (ours.attn_dropout,)
    assert model_type == "opt" and got == want == (24, 3, 40, 2, 33, 0.05, 0.2)


@pytest.mark.parametrize("which,prefix", [("opt", "model."), ("gpt2", "transformer.")])
def test_keys_without_prefix_and_pytorch_bin(tmp_path, which, prefix):
    hf = tiny_opt() if which == "opt" else tiny_gpt2()
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    if which == "gpt2":  # old GPT-2 files carry the causal mask as a tensor, in each block among its weights
        causal = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()  # and masked_bias, both saved by older versions
        mask = {"h.0.attn.bias": causal, "h.0.attn.masked_bias": torch.tensor(-1e4)}
        state = {**mask, **state}  # first: loading must go on past it to every other tensor
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(hf, tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoints_and_tokenizer_path(tmp_path, fmt):
    hf = tiny_opt()
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    shards = {f"{stem}-00001-of-00002.{fmt}": keys[::2], f"{stem}-00002-of-00002.{fmt}": keys[1::2]}
    for name, ks in shards.items():
        part = {k: state[k] for k in ks}
        save_file(part, str(tmp_path / name)) if fmt == "safetensors" else torch.save(part, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / f"{stem}.{fmt}.index.json").write_text(json.dumps(index))
    (tmp_path / "tokenizer.json").write_text("{}")
    ours = from_pretrained(tmp_path)
    assert ours.tokenizer_path == str(tmp_path / "tokenizer.json")
    assert_same_logits(hf, tmp_path)


@pytest.mark.parametrize("which", ["opt", "gpt2"])
def test_context_past_the_checkpoints_positions_is_a_clear_error(tmp_path, which):
    """A checkpoint's learned table ends at max_position_embeddings (40 here; OPT's has 2 offset rows more): one
    token past it is a ValueError naming both numbers, in forward, loss and generate, not an index error."""
    (tiny_opt() if which == "opt" else tiny_gpt2()).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    x = torch.randint(0, 97, (1, 41))
    assert ours(x[:, :40]).shape == (1, 40, 97)  # every learned position serves
    with pytest.raises(ValueError, match=r"sequence length 41 exceeds max_position_embeddings=40 of 'learned'"):
        ours(x)
    with pytest.raises(ValueError, match=r"sequence length 41 exceeds max_position_embeddings=40"):
        ours.loss(x, x)
    with pytest.raises(ValueError, match=r"prompt 30 \+ max_new_tokens 11 = 41 exceeds max_position_embeddings=40"):
        ours.generate(x[:, :30], max_new_tokens=11)


def test_clear_errors(tmp_path):
    hf = tiny_opt()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not supported; supported types: opt, gpt2, llama, qwen2, mistral"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "model.decoder.layers.1.fc1.weight"
    save_file({**state, key: state[key][:, :5].contiguous()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(tmp_path))}: tensor layers.1.fc1.weight has shape \(64, 5\) .* \(64, 32\)"
    ):
        from_pretrained(tmp_path)
    del state[key]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks tensors .*layers.1.fc1.weight"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("which", ["opt", "gpt2"])
def test_a_tied_checkpoint_that_also_stores_the_head_loads(tmp_path, which):
    """A .bin written by older transformers holds a tied head under its own key too (a state_dict names a shared
    tensor once per owner): a copy of the embedding, not a tensor without a place."""
    hf = tiny_opt() if which == "opt" else tiny_gpt2()
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save({**state, "lm_head.weight": hf.lm_head.weight.detach().clone()}, tmp_path / "pytorch_model.bin")
    assert_same_logits(hf, tmp_path)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"model_type": "opt", ', r"config.json cannot be read as JSON: Expecting"),
        ("[1, 2]", r"config.json: model_type None is not supported; supported types: opt, gpt2, llama, .*, slm-gpt$"),
        ('{"model_type": "opt", "vocab_size": 97}', r"config.json lacks the key 'hidden_size' that a opt config has$"),
    ],
    ids=["not-json", "not-an-object", "missing-key"],
)
def test_a_config_json_that_cannot_be_used_is_named(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/{message}"):
        read_config(tmp_path)


class _TouchOnLoad:
    """Unpickling this creates the file: what a malicious pytorch_model.bin would do with arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (type(self.path).touch, (self.path,))


def test_a_pickled_bin_cannot_run_code(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": _TouchOnLoad(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        from_pretrained(tmp_path)
    assert not marker.exists()


def test_folder_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json; expected a folder written by save_pretrained"):
        from_pretrained(tmp_path)
    tiny_opt().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.pt")
    with pytest.raises(
        FileNotFoundError,
        match=r"has no weights: looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
        r"pytorch_model.bin.index.json; found \['config.json', .*'weights.pt'\]",
    ):
        from_pretrained(tmp_path)
    save_file({**state, "model.decoder.extra.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint has tensors the model has no place for: \['extra.weight'\]"):
        from_pretrained(tmp_path)


def test_gpt2_tensor_the_model_has_no_place_for_is_named_wherever_it_sits(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save({"transformer.extra.weight": torch.ones(2), **state}, tmp_path / "pytorch_model.bin")  # first
    with pytest.raises(ValueError, match=r"checkpoint has tensors the model has no place for: \['extra.weight'\]"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "which,change,message",
    [
        (
            "opt",
            {"activation_function": "quick_gelu"},
            r"activation_function 'quick_gelu' is not supported; supported: \['gelu'",
        ),
        (
            "opt",
            {"layer_norm_elementwise_affine": False},
            r"json: OPT with layer_norm_elementwise_affine=false is not supported \(our LayerNorms are affine\)$",
        ),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "GPT-2 with scale_attn_by_inverse_layer_idx=true or"),
        (
            "gpt2",
            {"scale_attn_weights": False},
            "json: GPT-2 with scale_attn_by_inverse_layer_idx=true or scale_attn_weights=false is not supported$",
        ),
    ],
)
def test_unsupported_checkpoint_options_are_refused(tmp_path, which, change, message):
    (tiny_opt() if which == "opt" else tiny_gpt2()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)


def test_save_pretrained_carries_the_tokenizer_and_refuses_a_foreign_config(tmp_path):
    tiny_opt().save_pretrained(tmp_path / "opt")
    (tmp_path / "opt" / "tokenizer.json").write_text('{"tokenizer": 1}')
    model = from_pretrained(tmp_path / "opt")
    save_pretrained(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"tokenizer": 1}'
    loaded = from_pretrained(tmp_path / "ours")
    assert loaded.tokenizer_path == str(tmp_path / "ours" / "tokenizer.json")
    save_pretrained(loaded, tmp_path / "ours")  # onto its own tokenizer.json: nothing to copy
    model.config = GPTConfig(**{**model.config.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match=r"model has no tensors \['layers.2.attn_norm.weight'.*built from its own"):
        save_pretrained(model, tmp_path / "bad")


@pytest.mark.parametrize(
    "kw",
    [
        dict(position_embedding="rope", rotary_fraction=0.5),
        dict(position_embedding="alibi", tie_embeddings=False, pre_norm=False),
    ],
)
def test_save_pretrained_round_trip(tmp_path, kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_position_embeddings=16, **kw))
    randomize(model)
    folder = tmp_path / "runs" / "base"  # parent folders are created
    save_pretrained(model, folder)
    saved = load_file(str(folder / "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not model.config.tie_embeddings)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "slm-gpt"
    loaded = from_pretrained(folder)
    assert loaded.config == model.config
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_has_weights_knows_every_layout_from_pretrained_reads(tmp_path, name):
    assert not has_weights(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not has_weights(str(tmp_path))  # a config alone is no checkpoint
    (tmp_path / name).write_bytes(b"")
    assert has_weights(str(tmp_path))
