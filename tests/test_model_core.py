"""GPT core: shapes, causality, length limits, generation with a KV cache, dropout, checkpointing, compile."""

import pytest
import torch

from model import GPT, GPTConfig

KINDS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def tiny(kind="rope", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_position_embeddings=16, position_embedding=kind
    )
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_causality(kind):
    model = tiny(kind)
    x = torch.randint(0, 97, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 97) and logits.dtype == torch.float32
    for t in (0, 7, 14):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, 97, (2, 15 - t))
        torch.testing.assert_close(model(y)[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(model(y)[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_past_the_limit_is_a_clear_error(kind):
    model = tiny(kind)
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings=16"):
        model(torch.randint(0, 97, (1, 17)))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        model.generate(torch.randint(0, 97, (1, 10)), max_new_tokens=7)


@pytest.mark.parametrize("kind", ["rope", "alibi", "none"])
def test_relative_kinds_run_at_twice_the_length(kind):
    model = tiny(kind)
    x = torch.randint(0, 97, (2, 32))
    logits = model(x)
    assert logits.shape == (2, 32, 97) and torch.isfinite(logits).all()
    torch.testing.assert_close(model(x[:, :16]), logits[:, :16], rtol=0, atol=1e-5)  # grown tables agree
    assert not any("rope" in k or "alibi" in k or "sinusoidal" in k for k in model.state_dict())


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_head \(4\)"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="learned, sinusoidal, rope, alibi, none"):
        GPTConfig(position_embedding="xpos")
    with pytest.raises(ValueError, match="relu, gelu, gelu_tanh"):
        GPTConfig(activation="swish")
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)


def test_init_and_parameter_count():
    model = tiny("learned", n_layer=4, d_model=64, d_ff=256)
    d, f, V, P, L = 64, 256, 97, 16, 4
    per_block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    assert model.num_parameters() == V * d + P * d + L * per_block + 2 * d  # tied head counted once
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.layers[0].fc1.weight.std().item() - 0.02) < 0.003
    assert abs(model.layers[0].fc2.weight.std().item() - 0.02 / (2 * L) ** 0.5) < 0.001
    assert torch.all(model.layers[0].fc1.bias == 0)


def test_dropout_only_in_training():
    model = tiny("rope", dropout=0.3)
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_greedy_equals_full_recompute(kind):
    model = tiny(kind, max_position_embeddings=32)
    prompt = torch.randint(0, 97, (3, 5))
    fast = model.generate(prompt, max_new_tokens=12, temperature=0)
    slow = prompt
    with torch.no_grad():
        for _ in range(12):
            slow = torch.cat([slow, model(slow)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("kind", ["learned", "rope", "alibi"])
def test_cache_accepts_a_chunk_after_cached_tokens(kind):
    from model.attention import KVCache

    model = tiny(kind)
    x = torch.randint(0, 97, (2, 12))
    cache = KVCache(model.config.n_layer, 12)
    with torch.no_grad():
        first = model.hidden_states(x[:, :5], cache)
        second = model.hidden_states(x[:, 5:], cache)
        full = model.hidden_states(x)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=0, atol=1e-5)


def test_sampling_and_eos():
    model = tiny("rope")
    prompt = torch.randint(0, 97, (4, 3))
    torch.manual_seed(1)
    out = model.generate(prompt, max_new_tokens=6, temperature=0.8, top_k=5)
    assert out.shape == (4, 9) and torch.equal(out[:, :3], prompt)
    eos = int(model.generate(prompt, 1, temperature=0)[0, -1])  # row 0's greedy first token
    out = model.generate(prompt, max_new_tokens=6, temperature=0, eos_token_id=eos)
    assert torch.all(out[0, 3:] == eos)  # finished rows are padded with eos


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = tiny("alibi").train()
        model.gradient_checkpointing = ckpt
        model.loss(x, torch.roll(x, -1, 1)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["learned", "rope", "alibi"])
def test_no_graph_breaks_under_dynamo(kind):
    model = tiny(kind)
    x = torch.randint(0, 97, (2, 16))
    model(x)  # tables already built: the common path
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
