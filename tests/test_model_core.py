"""GPT core: shapes, causality, length limits, generation with a KV cache, dropout, checkpointing, compile."""

import pytest
import torch

from model.attention import KVCache

KINDS = ["learned", "sinusoidal", "rope", "alibi", "none"]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_causality(kind, tiny_gpt):
    model = tiny_gpt(kind)
    x = torch.randint(0, 97, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 97) and logits.dtype == torch.float32
    for t in (0, 7, 14):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, 97, (2, 15 - t))
        torch.testing.assert_close(model(y)[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(model(y)[:, t + 1 :], logits[:, t + 1 :])
    for t in (1, 2, 3):  # short prefixes take the same causal path (SDPA's is_causal)
        torch.testing.assert_close(model(x[:, :t]), logits[:, :t], rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny_gpt(kind)(x[:, :1]), logits[:, :1], rtol=0, atol=1e-5)  # one token first
    assert not any(k.startswith(("rope", "alibi", "sinusoidal")) for k in model.state_dict())  # derived, not saved


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_past_the_limit_is_a_clear_error(kind, tiny_gpt):
    model = tiny_gpt(kind)
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings=16"):
        model(torch.randint(0, 97, (1, 17)))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        model.generate(torch.randint(0, 97, (1, 10)), max_new_tokens=7)


@pytest.mark.parametrize("kind", ["rope", "alibi", "none"])
def test_relative_kinds_run_at_twice_the_length(kind, tiny_gpt):
    x = torch.randint(0, 97, (2, 32))
    short = tiny_gpt(kind)(x[:, :16])  # tables as built: 16 positions
    model = tiny_gpt(kind)
    logits = model(x)  # grows the tables to 32 positions
    assert logits.shape == (2, 32, 97) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, :16], short, rtol=0, atol=1e-5)  # grown tables agree with the built ones
    assert not any(k.startswith(("rope", "alibi")) for k in model.state_dict())  # grown tables are not saved either


def test_init_and_parameter_count(tiny_gpt):
    model = tiny_gpt("learned", n_layer=4, d_model=64, d_ff=256)
    d, f, V, P, L = 64, 256, 97, 16, 4
    per_block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    assert model.num_parameters() == V * d + P * d + L * per_block + 2 * d  # tied head counted once
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.tokenizer_path is None and model.hf_module_prefix == ""  # only from_pretrained sets them
    untied = tiny_gpt("learned", n_layer=4, d_model=64, d_ff=256, tie_embeddings=False, position_offset=2)
    assert untied.num_parameters() == 2 * V * d + (P + 2) * d + L * per_block + 2 * d  # head has no bias
    model.embed_tokens.weight.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - V * d
    # GPT-2 init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L)), biases 0, LayerNorms identity
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "norm.bias")):
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            std = 0.02 / (2 * L) ** 0.5 if name.endswith(("out_proj.weight", "fc2.weight")) else 0.02
            assert abs(p.std().item() / std - 1) < 0.1 and abs(p.mean().item()) < 4 * std / p.numel() ** 0.5, name


def test_dropout_only_in_training(tiny_gpt):
    """In eval, a model with dropout gives exactly the logits of the same weights built without it; in training,
    residual dropout and attention dropout each change them, differently on every call."""
    x = torch.randint(0, 97, (2, 16))
    reference = tiny_gpt("rope")(x)  # the factory seeds: same weights
    for kw in (dict(dropout=0.3, attention_dropout=0.0), dict(dropout=0.0, attention_dropout=0.3)):
        model = tiny_gpt("rope", **kw)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
        model.train()
        first = model(x)
        assert not torch.allclose(first, reference) and not torch.allclose(first, model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_greedy_equals_full_recompute(kind, tiny_gpt, device):
    model = tiny_gpt(kind, max_position_embeddings=32).to(device)
    prompt = torch.randint(0, 97, (3, 5), device=device)
    fast = model.generate(prompt, max_new_tokens=12, temperature=0)
    slow = prompt
    with torch.no_grad():
        for _ in range(12):
            slow = torch.cat([slow, model(slow)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("kind", ["learned", "rope", "alibi"])
def test_cache_accepts_a_chunk_after_cached_tokens(kind, pre_norm, tiny_gpt, device):
    model = tiny_gpt(kind, pre_norm=pre_norm).to(device)
    x = torch.randint(0, 97, (2, 12), device=device)
    cache = KVCache(model.config.n_layer, 12)
    with torch.no_grad():  # chunks of 1, 2, 4 and 5 tokens: starting at 0, 1, 3 and 7
        parts = [model.hidden_states(x[:, a:b], cache) for a, b in ((0, 1), (1, 3), (3, 7), (7, 12))]
        full = model.hidden_states(x)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_sampling_draws_from_the_top_k_and_eos_ends_rows(tiny_gpt):
    model = tiny_gpt("rope")
    prompt = torch.randint(0, 97, (4, 3))
    out = model.generate(prompt, max_new_tokens=6, temperature=0.8, top_k=5)
    assert out.shape == (4, 9) and torch.equal(out[:, :3], prompt)
    with torch.no_grad():
        top5 = model(out[:, :-1])[:, 2:].topk(5, dim=-1).indices  # (4, 6, 5): the 5 most likely at each new step
    assert (top5 == out[:, 3:, None]).any(-1).all()
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, temperature=100.0, top_k=1), greedy)  # top-1 is greedy at any T
    eos = int(greedy[0, 3])  # row 0's greedy first token
    out = model.generate(prompt, max_new_tokens=6, temperature=0, eos_token_id=eos)
    assert out.shape == (4, 9) and torch.all(out[0, 3:] == eos)  # a finished row is padded with eos
    assert model.generate(prompt[:1], max_new_tokens=6, temperature=0, eos_token_id=eos).shape == (1, 4)  # all done


def test_sample_follows_the_tempered_softmax():
    """_sample draws from softmax(logits / T) restricted to the top k: frequencies over 20000 draws within 5 standard
    errors of the exact probabilities."""
    from model.gpt import _sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(20000, 5)
    for temperature, top_k in ((0.5, None), (2.0, None), (1.0, 3)):
        want = (logits[0] / temperature).softmax(-1)
        if top_k is not None:
            want = torch.where(logits[0] >= logits[0].topk(top_k).values[-1], want, 0.0)
            want = want / want.sum()
        got = torch.bincount(_sample(logits, temperature, top_k)[:, 0], minlength=5) / 20000
        assert ((got - want).abs() <= 5 * (want * (1 - want) / 20000).sqrt() + 1e-9).all(), (temperature, got, want)


def test_generate_and_forward_refuse_bad_arguments(tiny_gpt):
    model = tiny_gpt("rope")
    prompt = torch.randint(0, 97, (2, 3))
    for kw in (dict(max_new_tokens=-1), dict(max_new_tokens=2, temperature=-0.5), dict(max_new_tokens=2, top_k=0)):
        with pytest.raises(ValueError, match="need max_new_tokens >= 0, temperature >= 0, top_k > 0 or None"):
            model.generate(prompt, **kw)
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\), got shape \(6,\)"):
        model(prompt.flatten())
    cache = KVCache(model.config.n_layer, 4)
    model.hidden_states(prompt, cache)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens; writing up to position 6 overflows it"):
        model.hidden_states(prompt, cache)


@pytest.mark.parametrize("kind,frozen_embeddings", [("alibi", False), ("rope", True)])
def test_gradient_checkpointing_gives_the_same_gradients_and_saves_less(tiny_gpt, kind, frozen_embeddings):
    """Same gradients, with each kind of attention input (RoPE tables, the ALiBi mask), also when the blocks' input
    needs no gradient (frozen embeddings, as under LoRA: reentrant checkpointing would then drop the blocks'
    gradients); and what it is for: the blocks' activations are not kept for backward (counted through
    saved-tensor hooks)."""
    x = torch.randint(0, 97, (2, 16))
    grads, saved = [], []
    for ckpt in (False, True):
        model = tiny_gpt(kind, gradient_checkpointing=ckpt).train()
        model.embed_tokens.weight.requires_grad_(not frozen_embeddings)
        assert model.gradient_checkpointing == ckpt
        saved.append(0)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(saved.pop() + t.numel()) or t, lambda t: t
        ):
            loss = model.loss(x, torch.roll(x, -1, 1))
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert len(grads[1]) == len(grads[0]) and all(g is not None for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert saved[1] < saved[0] / 2, saved


@pytest.mark.parametrize("kind", ["learned", "rope", "alibi"])
def test_no_graph_breaks_under_dynamo(kind, tiny_gpt):
    model = tiny_gpt(kind)
    x = torch.randint(0, 97, (2, 16))
    model(x)  # tables already built: the common path
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_compiled_blocks_match_eager(tiny_gpt, device):
    """torch.compile of each block, as bench.train's "blocks" mode (inductor: C++ on CPU, Triton on CUDA): the same
    loss and gradients as eager. Measured on CPU: loss identical, gradients (size <= 0.5) within 9e-8 of eager's, a
    few float32 ulps from fused kernels; the bound is ~10x that."""
    x = torch.randint(0, 97, (2, 16), device=device)
    models = [tiny_gpt("rope").to(device).train() for _ in range(2)]
    torch._dynamo.reset()
    for block in models[1].layers:
        block.compile()
    losses = [model.loss(x, torch.roll(x, -1, 1)) for model in models]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    for (name, eager), compiled in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(compiled.grad, eager.grad, rtol=0, atol=1e-6, msg=name)
