"""Position tables against their papers' formulas, and the GPT with each kind of positions against an explicit
float64 forward (softmax attention, positions from the formulas), in float64 and under bf16 autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from model.positions import alibi_bias, alibi_slopes, apply_rope, rope_tables, sinusoidal_table


def rotate(x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (D,) at absolute position pos, through apply_rope's (B, T, H, D) layout."""
    return apply_rope(x.view(1, 1, 1, -1), cos[pos].view(1, 1, -1), sin[pos].view(1, 1, -1)).view(-1)


def test_rope_dot_product_depends_only_on_the_offset():
    torch.manual_seed(0)
    cos, sin = (t.double() for t in rope_tables(600, 16, 10000.0))
    for _ in range(5):
        q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        for m, n in [(3, 0), (10, 10), (7, 12)]:
            ref = rotate(q, m, cos, sin) @ rotate(k, n, cos, sin)
            for shift in (1, 37, 500):
                got = rotate(q, m + shift, cos, sin) @ rotate(k, n + shift, cos, sin)
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(
            rotate(q, 5, cos, sin) @ rotate(k, 0, cos, sin), rotate(q, 6, cos, sin) @ rotate(k, 0, cos, sin)
        )


def test_rope_rotates_pairs_half_apart_and_keeps_norms():
    cos, sin = rope_tables(8, 4, 10000.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # frequency 0 acts on dims (0, 2) with angle p, frequency 1 on dims (1, 3) with angle p / 100
    got = rotate(x, 3, cos, sin)
    a, b = 3.0, 3.0 / 100.0
    want = torch.tensor(
        [
            1 * math.cos(a) - 3 * math.sin(a),
            2 * math.cos(b) - 4 * math.sin(b),
            3 * math.cos(a) + 1 * math.sin(a),
            4 * math.cos(b) + 2 * math.sin(b),
        ]
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("seq", [10, 4], ids=["T10", "T-equals-rot"])  # T == rot must not look like full rotary
def test_partial_rotary_passes_the_rest_through(seq):
    cos, sin = rope_tables(seq, 4, 10000.0)  # rotate 4 of 8 dims
    x = torch.randn(2, seq, 3, 8)
    y = apply_rope(x, cos[:, None], sin[:, None])
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))
    torch.testing.assert_close(y[..., :4], apply_rope(x[..., :4], cos[:, None], sin[:, None]))  # as full rotary


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head slopes, then the odd-numbered slopes of the 16-head sequence 2^(-0.5 (i+1))
    want = [2.0 ** -(i + 1) for i in range(8)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(want))


def test_alibi_bias_is_relative_and_causal():
    bias = alibi_bias(alibi_slopes(4), 5)  # (H, 5, 5)
    assert bias.shape == (4, 5, 5)
    assert torch.isinf(bias[:, 0, 1:]).all() and torch.all(bias.diagonal(dim1=1, dim2=2) == 0)
    torch.testing.assert_close(bias[1, 4, 1], torch.tensor(-3 * 2.0**-4))


def test_sinusoidal_values():
    d = 16
    table = sinusoidal_table(128, d)
    for p in (0, 1, 7, 100):
        for i in (0, 3, 7):
            angle = p / 10000 ** (2 * i / d)
            assert math.isclose(table[p, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


# ---------------------------------------------------------------------- the GPT with each kind, against a reference


def reference_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """An independent float64 forward of a pre- or post-LN GELU GPT: positions from their formulas (not
    model/positions.py), attention as an explicit masked softmax (not SDPA). x (B, T) -> logits (B, T, V). The
    model keeps its sin/cos tables in float32 whatever its dtype (model/positions.py), so the reference rounds them
    the same way."""
    cfg, sd = model.config, {k: v.double() for k, v in model.state_dict().items()}
    B, T = x.shape
    H, D, d = cfg.n_head, cfg.head_dim, cfg.d_model
    pos = torch.arange(T, dtype=torch.float64, device=x.device)
    h = sd["embed_tokens.weight"][x]  # (B, T, d)
    if cfg.position_embedding == "learned":
        h = h + sd["embed_positions.weight"][:T]
    if cfg.position_embedding == "sinusoidal":
        angle = pos[:, None] / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # (T, d/2)
        h = h + torch.stack((angle.sin(), angle.cos()), -1).flatten(1).float()  # sin at even dims, cos at odd
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()

    def norm(t: torch.Tensor, w: dict, name: str) -> torch.Tensor:
        return F.layer_norm(t, (d,), w[f"{name}.weight"], w[f"{name}.bias"], cfg.layer_norm_eps)

    for i in range(cfg.n_layer):
        w = {k.removeprefix(f"layers.{i}."): v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        a = norm(h, w, "attn_norm") if cfg.pre_norm else h  # post-LN (OPT-350m): the norm comes after the sum
        q, k, v = (
            (a @ w[f"self_attn.{n}_proj.weight"].t() + w[f"self_attn.{n}_proj.bias"]).view(B, T, H, D).transpose(1, 2)
            for n in "qkv"
        )  # (B, H, T, D)
        if cfg.position_embedding == "rope":  # pair (j, j + rot/2) turns by pos * base^(-2j/rot)
            half = cfg.rotary_dim // 2
            angle = pos[:, None] * cfg.rope_base ** (
                -2 * torch.arange(half, dtype=torch.float64, device=x.device) / cfg.rotary_dim
            )
            c, s = angle.cos().float().double(), angle.sin().float().double()  # (T, half)
            q, k = (
                torch.cat(
                    (
                        t[..., :half] * c - t[..., half : 2 * half] * s,
                        t[..., half : 2 * half] * c + t[..., :half] * s,
                        t[..., 2 * half :],
                    ),
                    -1,
                )
                for t in (q, k)
            )
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
        if cfg.position_embedding == "alibi":  # H a power of two: slopes 2^(-8 (h+1) / H)
            slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float64, device=x.device) / H)
            scores = scores - slopes[:, None, None] * (pos[:, None] - pos[None, :])
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
        h = h + y.transpose(1, 2).reshape(B, T, d) @ w["self_attn.out_proj.weight"].t() + w["self_attn.out_proj.bias"]
        h = h if cfg.pre_norm else norm(h, w, "attn_norm")
        m = norm(h, w, "mlp_norm") if cfg.pre_norm else h
        h = h + F.gelu(m @ w["fc1.weight"].t() + w["fc1.bias"]) @ w["fc2.weight"].t() + w["fc2.bias"]
        h = h if cfg.pre_norm else norm(h, w, "mlp_norm")
    if cfg.final_norm:
        h = norm(h, sd, "final_norm")
    return h @ sd["lm_head.weight"].t()


KINDS = [
    dict(position_embedding="learned"),
    dict(position_embedding="sinusoidal"),
    dict(position_embedding="rope"),
    dict(position_embedding="rope", rotary_fraction=0.5, rope_base=500.0),
    dict(position_embedding="alibi"),
    dict(position_embedding="none"),
    dict(position_embedding="rope", pre_norm=False, final_norm=False),  # post-LN blocks (OPT-350m's layout)
    dict(position_embedding="alibi", pre_norm=False),
]


def random_gpt(kw: dict) -> GPT:
    """A tiny GPT with random values in every parameter (biases and LayerNorms too), logits of size ~1."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_position_embeddings=16, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_gpt_matches_an_explicit_float64_forward(kw, device):
    """Positions, SDPA's causal masking (is_causal, ALiBi's bias as the mask) and the blocks, on `device`."""
    model = random_gpt(kw).to(device, torch.float64)
    x = torch.randint(0, 97, (2, 16), device=device)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_gpt_under_bf16_autocast_within_bf16_rounding(kw, device):
    """The float32 model under bf16 autocast (bf16 GEMMs and attention: flash / memory-efficient SDPA kernels on
    CUDA) against the float64 forward. bf16 keeps 8 significant bits (unit roundoff u = 2^-8), and each of the ~10
    GEMM outputs on the way to the logits is rounded to it. Measured on CPU over 10 seeds per kind:
    max|error| <= 2.2 u max|logit| (logits of size ~2); the bound, 6 u max|logit|, leaves ~3x for other kernels.
    It catches what breaks the autocast path (a mask or RoPE table in the wrong dtype or place, a missing term); a
    dropped q_proj or fc2 bias moves the logits by only 0.5-3x the bound, which is why the float64 test above pins
    every term."""
    model = random_gpt(kw).to(device)
    x = torch.randint(0, 97, (2, 16), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        got = model(x)
    want = reference_logits(model, x)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= 6 * 2.0**-8 * want.abs().max()


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict]:
    """What every scaled_dot_product_attention call of the test receives: dtypes, mask, is_causal."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        mask_dtype = {attn_mask.dtype} if attn_mask is not None else set()
        calls.append({"dtypes": {q.dtype, k.dtype, v.dtype} | mask_dtype, "mask": attn_mask, "is_causal": is_causal})
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    return calls


@pytest.mark.parametrize("kw", [k for k in KINDS if k["position_embedding"] in ("rope", "alibi")], ids=str)
def test_under_autocast_attention_gets_every_input_in_the_autocast_dtype(kw, device, sdpa_calls):
    """The RoPE tables and the ALiBi bias are cast to the compute dtype before use, so q and k stay bf16: a float32
    table would promote them to float32 copies per layer (autocast then casts them back for SDPA, so the logits
    alone cannot show it)."""
    model = random_gpt(kw).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(torch.randint(0, 97, (2, 16), device=device))
    assert [call["dtypes"] for call in sdpa_calls] == [{torch.bfloat16}] * model.config.n_layer


@pytest.mark.parametrize("kind", ["learned", "rope", "none"])
def test_without_alibi_attention_needs_no_mask_tensor(kind, sdpa_calls):
    """A full sequence runs as is_causal with no mask tensor (what lets SDPA pick its flash / memory-efficient
    kernels); a one-token decoding step passes neither, as it sees every cached key. Only a chunk of several tokens
    after cached ones needs a mask."""
    model = random_gpt({"position_embedding": kind})
    prompt = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        model(prompt)
        model.generate(prompt, max_new_tokens=3, temperature=0)
    flags = [(call["mask"] is None, call["is_causal"]) for call in sdpa_calls]
    L = model.config.n_layer
    assert flags == [(True, True)] * L * 2 + [(True, False)] * L * 2  # forward, prefill, then two decoding steps
