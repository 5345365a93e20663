"""The GPT with LoRA injected: target lists, cached generation, and adapter parity with PEFT on transformers' OPT."""

import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from lora import LoRAConfig, inject_lora, save_adapter
from model import GPT, from_pretrained

SEED_TARGETS = [
    ["q_proj", "v_proj"],
    ["q_proj", "k_proj", "v_proj", "out_proj"],
    ["q_proj", "v_proj", "fc1", "fc2"],
    ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
]


def train_a_few_steps(model: GPT, steps: int = 3) -> None:
    """Random data, large lr: enough to make every lora_B non-zero."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (4, 12)).to(model.lm_head.weight.device)
        model.loss(x, torch.roll(x, -1, dims=1)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("targets", SEED_TARGETS, ids=lambda t: "+".join(t))
def test_seed_target_lists_wrap_the_expected_modules(targets, tiny_gpt):
    model = tiny_gpt()
    names = inject_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=targets))
    assert len(names) == model.config.n_layer * len(targets)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(targets)


@pytest.mark.parametrize("kind", ["learned", "alibi"])
def test_kv_cache_generation_with_lora(kind, tiny_gpt, device):
    model = tiny_gpt(kind, max_position_embeddings=32).to(device)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=SEED_TARGETS[-1]))
    train_a_few_steps(model)
    prompt = torch.randint(0, 97, (2, 4), device=device)
    fast = model.generate(prompt, max_new_tokens=10, temperature=0)
    slow = prompt
    with torch.no_grad():
        for _ in range(10):
            slow = torch.cat([slow, model(slow)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, slow)


@pytest.fixture
def opt_pair(tmp_path):
    """A random tiny transformers OPT, and our GPT imported from its saved folder."""
    cfg = transformers.OPTConfig(
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
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    return hf, from_pretrained(tmp_path / "base")


def trained_adapter(ours: GPT, folder) -> None:
    inject_lora(ours, LoRAConfig(rank=4, alpha=8.0, target_modules=SEED_TARGETS[2]))
    train_a_few_steps(ours)
    save_adapter(ours, folder)


# max|PEFT on transformers' OPT - our GPT|, both with the same trained adapter, measured on CPU over 8 seeds: 1.8e-7
# in float32 (logits of size ~0.6) and 2.8e-16 in float64; the bounds are ~5x and ~35x that. The adapter itself
# moves the logits by 8.7e-2 or more, so an adapter PEFT loads wrongly, or not at all, cannot pass.
FLOAT32_ATOL = 1e-6
FLOAT64_ATOL = 1e-14


def test_adapter_loads_into_peft_as_saved_and_means_the_same(opt_pair, tmp_path):
    """Plain PeftModel.from_pretrained on save_adapter's files: save_adapter names modules under
    model.hf_module_prefix (transformers' paths: model.decoder.layers.*), every key finds its module (PEFT only
    warns on missing ones: made an error here), and PEFT's logits equal ours."""
    hf, ours = opt_pair
    trained_adapter(ours, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert ours.hf_module_prefix == "model.decoder."
    assert len(keys) == 2 * 2 * len(SEED_TARGETS[2]) and all(
        k.startswith("base_model.model.model.decoder.layers.") for k in keys
    ), sorted(keys)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        base = hf(x).logits  # before PEFT injects into hf in place
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(x).logits
        assert (got - base).abs().max().item() > 1e-2  # the trained adapter does change the output
        assert (got - ours(x)).abs().max().item() <= FLOAT32_ATOL
        assert (peft_model.double()(x).logits - ours.double()(x)).abs().max().item() <= FLOAT64_ATOL


def test_save_pretrained_of_an_injected_model_writes_the_base(tmp_path, tiny_gpt):
    from model import save_pretrained

    model = tiny_gpt("alibi")
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        base = model(x)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "fc2"]))
    train_a_few_steps(model)
    save_pretrained(model, tmp_path)
    assert not any("lora" in k for k in load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():  # the very weights, in the same order of operations: bit-identical, not merely close
        assert torch.equal(from_pretrained(tmp_path)(x), base)
