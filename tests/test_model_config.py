"""GPTConfig: every bad value is refused up front with a message naming the field, the value and the fix; the
boundary values are accepted; the derived widths are what the model builds."""

import pytest

from model import GPTConfig

BAD = [
    (dict(vocab_size=0), r"GPTConfig.vocab_size must be a positive int, got 0"),
    (dict(n_layer=2.0), r"GPTConfig.n_layer must be a positive int, got 2.0"),
    (dict(n_head=True), r"GPTConfig.n_head must be a positive int, got True"),
    (dict(d_model=-32), r"GPTConfig.d_model must be a positive int, got -32"),
    (dict(d_ff=0), r"GPTConfig.d_ff must be a positive int, got 0"),
    (dict(max_position_embeddings=0), r"GPTConfig.max_position_embeddings must be a positive int, got 0"),
    (dict(d_model=30, n_head=4), r"d_model \(30\) must be divisible by n_head \(4\); pick n_head among the divisors"),
    (dict(position_embedding="xpos"), r"position_embedding='xpos' is unknown; choose one of learned, sinusoidal, rope"),
    (dict(activation="swish"), r"activation='swish' is unknown; choose one of relu, gelu, gelu_tanh"),
    (dict(dropout=1.0), r"GPTConfig.dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"GPTConfig.dropout must be in \[0, 1\), got -0.1"),
    (dict(attention_dropout=1.5), r"GPTConfig.attention_dropout must be in \[0, 1\), got 1.5"),
    (dict(position_offset=-1), r"GPTConfig.position_offset must be >= 0, got -1"),
    (dict(position_embedding="sinusoidal", d_model=33, n_head=3), r"sinusoidal positions need an even d_model, got 33"),
    (dict(rotary_fraction=0.0), r"GPTConfig.rotary_fraction must be in \(0, 1\], got 0.0"),
    (dict(rotary_fraction=1.5), r"GPTConfig.rotary_fraction must be in \(0, 1\], got 1.5"),
    (dict(d_model=32, n_head=8, rotary_fraction=0.4), r"rotary_fraction=0.4 of head_dim 4 rotates fewer than 2 dims"),
    (dict(rope_base=1.0), r"GPTConfig.rope_base must be > 1, got 1.0"),
    (dict(word_embed_proj_dim=0), r"GPTConfig.word_embed_proj_dim must be positive or None, got 0"),
]


@pytest.mark.parametrize("kw,message", BAD, ids=[next(iter(kw)) for kw, _ in BAD])
def test_bad_values_name_the_problem(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kw)


def test_boundary_values_are_accepted():
    """The smallest valid values, and the edges the checks must not refuse."""
    GPTConfig(vocab_size=1, n_layer=1, n_head=1, d_model=2, d_ff=1, max_position_embeddings=1, rotary_fraction=1.0)
    GPTConfig(dropout=0.0, attention_dropout=0.999, position_offset=0, rope_base=1.001, word_embed_proj_dim=None)
    GPTConfig(position_embedding="sinusoidal", d_model=32, n_head=4)
    GPTConfig(position_embedding="learned", rope_base=1.0, rotary_fraction=0.0)  # RoPE knobs only matter for rope


def test_derived_widths():
    cfg = GPTConfig(d_model=64, n_head=4, rotary_fraction=0.45, dropout=0.2)
    assert cfg.head_dim == 16
    assert cfg.rotary_dim == 6  # int(16 * 0.45) = 7, rounded down to even
    assert cfg.embed_dim == 64 and GPTConfig(word_embed_proj_dim=16).embed_dim == 16
    assert cfg.attn_dropout == 0.2 and GPTConfig(dropout=0.2, attention_dropout=0.0).attn_dropout == 0.0


def test_dict_round_trip_and_unknown_fields():
    cfg = GPTConfig(n_layer=3, position_embedding="alibi", word_embed_proj_dim=16)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown GPTConfig fields \['n_layers'\]; valid fields are \['activation'"):
        GPTConfig.from_dict({"n_layers": 2})


def test_the_smallest_embedding_projection_is_one():
    assert GPTConfig(vocab_size=11, word_embed_proj_dim=1).word_embed_proj_dim == 1
    with pytest.raises(ValueError, match="word_embed_proj_dim"):
        GPTConfig(vocab_size=11, word_embed_proj_dim=0)


@pytest.mark.parametrize("flag", ["attn_bias", "o_bias", "mlp_bias"])
def test_a_parts_own_bias_flag_overrides_bias_only_when_set(flag):
    for bias in (True, False):
        assert GPTConfig(bias=bias).part_bias(flag) is bias
        assert GPTConfig(bias=bias, **{flag: not bias}).part_bias(flag) is (not bias)
    others = {"attn_bias", "o_bias", "mlp_bias"} - {flag}
    assert not any(GPTConfig(bias=False, **{flag: True}).part_bias(o) for o in others)
