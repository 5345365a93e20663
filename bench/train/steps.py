"""The contenders of `python -m bench.train`: one training step of our GPT or of transformers' OPT / Llama.

Both sides are loaded from the same folder (a random-init OPTForCausalLM, or LlamaForCausalLM for a Llama-family
shape such as SmolLM2-135M's, saved with save_pretrained),
so they compute the same function; the LoRA A matrices of ours are copied from PEFT's so that the
two also train the same (B is zero on both at step 0). One step = forward, loss, backward, AdamW
over the trainable parameters, zero_grad; it returns the loss as a tensor (no host sync).

Precision "bf16": autocast to bf16 on both sides. LoRA keeps its adapters in fp32 on both sides (PEFT's default
`autocast_adapter_dtype=True`); the frozen base is transformers' whole model in bf16 on the peer's side, and on
ours what the lab trains (training.precision.keep_frozen_in: the frozen linears in bf16; embeddings, norms and the
residual stream fp32); full fine-tuning keeps fp32 master weights. "fp32": no autocast.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.inject import SEED_TARGETS

TARGETS_QV = ("q_proj", "v_proj")
TARGETS_ALL = SEED_TARGETS  # the six Linears of an OPT block
TARGETS_LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a Llama block's 7
LR = 1e-4


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    vocab: int
    batch: int
    seq: int
    arch: str = "opt"  # "opt" | "llama" (RMSNorm, gated SiLU MLP, grouped-query attention, RoPE)
    n_kv_head: int | None = None  # llama: key/value heads (None: n_head)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


SHAPES = {
    # the CPU comparison shape; ~0.5 s per step for transformers + PEFT on a quiet 2-core machine
    "cpu": Shape(d_model=256, n_layer=4, n_head=4, d_ff=1024, vocab=8192, batch=8, seq=256),
    # opt-125m, 16k tokens per step at both lengths
    "gpu-512": Shape(d_model=768, n_layer=12, n_head=12, d_ff=3072, vocab=50272, batch=32, seq=512),
    "gpu-2048": Shape(d_model=768, n_layer=12, n_head=12, d_ff=3072, vocab=50272, batch=8, seq=2048),
    # SmolLM2-135M (the named base smollm2-135m): 30 Llama blocks, 9 query / 3 key-value heads, 2 x 512 tokens
    "smollm2-135m": Shape(
        d_model=576, n_layer=30, n_head=9, d_ff=1536, vocab=49152, batch=2, seq=512, arch="llama", n_kv_head=3
    ),
    # for tests: seconds on a CPU
    "tiny": Shape(d_model=32, n_layer=2, n_head=2, d_ff=64, vocab=128, batch=2, seq=16),
}


@dataclass(frozen=True)
class Spec:
    """One contender. The fields after `alpha` are our side's switches (the optimisation ablations)."""

    side: str = "ours"  # "ours" | "peer" (transformers OPT, + PEFT for LoRA)
    mode: str = "lora"  # "lora" | "full" fine-tuning
    targets: tuple[str, ...] = TARGETS_QV
    rank: int = 16
    alpha: float = 32.0
    lora_impl: str = "fused"  # ours: "fused" custom Function | "plain" autograd (LoRALinear.fused=False)
    loss: str = "chunked"  # ours: "chunked" GPT.loss | "full" logits + F.cross_entropy
    loss_chunk: int | None = None  # ours: tokens per chunk of GPT.loss (None: the model's default)
    compile: str = ""  # ours: torch.compile of "loss" (forward + loss) | each of the "blocks"
    checkpointing: bool = False  # activation checkpointing per block (both sides)
    fused_adamw: bool | None = None  # None: fused on CUDA, foreach on CPU (same on both sides)

    @property
    def label(self) -> str:
        name = {"ours": "ours", "peer": "peft" if self.mode == "lora" else "hf"}[self.side]
        parts = [name, self.mode]
        if self.mode == "lora":
            named = {TARGETS_QV: "qv", TARGETS_ALL: "all6", TARGETS_LLAMA_ALL: "all7"}
            parts.append(named.get(self.targets, "+".join(self.targets)))
            if self.rank != 16:
                parts.append(f"r{self.rank}")
        default = Spec()
        for key, tag in (
            ("lora_impl", "plain-lora"),
            ("loss", "full-logits"),
            ("loss_chunk", None),
            ("compile", None),
            ("checkpointing", "ckpt"),
            ("fused_adamw", None),
        ):
            value = getattr(self, key)
            if value != getattr(default, key):
                if key == "compile":
                    tag = f"compiled-{value}"
                elif key == "loss_chunk":
                    tag = f"chunk{value}"
                parts.append(tag or ("fused-adamw" if value else "foreach-adamw"))
        return " ".join(parts)

    def peer(self) -> Spec:
        """The transformers (+ PEFT) contender this one is compared against."""
        return replace(self, side="peer", lora_impl="fused", loss="chunked", loss_chunk=None, compile="")

    def to_dict(self) -> dict:
        return asdict(self) | {"label": self.label}


@dataclass
class Contender:
    spec: Spec
    model: nn.Module
    loss_fn: Callable[[], torch.Tensor]  # forward + loss on the bench batch, under the bench precision
    step: Callable[[], torch.Tensor]  # loss_fn + backward + optimizer step + zero_grad
    optimizer: torch.optim.Optimizer
    trainable: int
    total: int
    wrapped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- shared inputs
def _quiet_transformers() -> None:
    """No progress bars or deprecation chatter from transformers / PEFT in the benchmark's output."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def save_random(shape: Shape, folder: str, seed: int = 0) -> None:
    """A random-init transformers model of `shape` (its `arch`), saved with save_pretrained: both sides load it."""
    if shape.arch == "llama":
        save_random_llama(shape, folder, seed)
    elif shape.arch == "opt":
        save_random_opt(shape, folder, seed)
    else:
        raise ValueError(f"Shape.arch must be 'opt' or 'llama', got {shape.arch!r}")


def save_random_llama(shape: Shape, folder: str, seed: int = 0) -> None:
    """A random-init LlamaForCausalLM of `shape` (tied head, SmolLM2's rope_theta and eps), saved with
    save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv_head or shape.n_head,
        max_position_embeddings=max(2048, shape.seq),
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def save_random_opt(shape: Shape, folder: str, seed: int = 0) -> None:
    """A random-init OPTForCausalLM of `shape`, saved with save_pretrained: the one source of weights."""
    from transformers import OPTConfig, OPTForCausalLM

    _quiet_transformers()

    cfg = OPTConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d_model,
        num_hidden_layers=shape.n_layer,
        ffn_dim=shape.d_ff,
        num_attention_heads=shape.n_head,
        word_embed_proj_dim=shape.d_model,
        max_position_embeddings=max(2048, shape.seq),
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        use_cache=False,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    OPTForCausalLM(cfg).save_pretrained(folder)


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs and next-token targets, both contiguous int64 on `device`."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=g)
    return tok[:, :-1].contiguous().to(device), tok[:, 1:].contiguous().to(device)


def autocast_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the two sides
def _build_peer(spec: Spec, folder: str, device: torch.device, precision: str, x, y):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    dtype = torch.bfloat16 if precision == "bf16" and spec.mode == "lora" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype).to(device)
    model.config.use_cache = False
    if spec.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped: list[str] = []
    if spec.mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0, bias="none"
        )
        model = get_peft_model(model, cfg)  # adapters in fp32 (autocast_adapter_dtype=True)
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)]
    return model, (lambda: model(input_ids=x, labels=y, shift_labels=y).loss), wrapped


def _build_ours(spec: Spec, folder: str, device: torch.device, precision: str, x, y):
    from lora import LoRAConfig, inject_lora
    from model import from_pretrained
    from training.precision import keep_frozen_in

    if spec.lora_impl not in ("fused", "plain"):
        raise ValueError(f"lora_impl must be 'fused' or 'plain', got {spec.lora_impl!r}")
    model = from_pretrained(folder).to(device)
    model.gradient_checkpointing = spec.checkpointing
    wrapped: list[str] = []
    if spec.mode == "lora":  # adapters fp32 (LoRALinear's masters); bf16: frozen linears in bf16, as the lab runs
        wrapped = inject_lora(
            model, LoRAConfig(rank=spec.rank, alpha=spec.alpha, dropout=0.0, target_modules=list(spec.targets))
        )
        keep_frozen_in(model, torch.bfloat16 if precision == "bf16" else None)
        for name in wrapped:
            model.get_submodule(name).fused = spec.lora_impl == "fused"

    if spec.loss == "chunked":
        forward_loss = lambda: model.loss(x, y, chunk_size=spec.loss_chunk)
    elif spec.loss == "full":
        forward_loss = lambda: F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    else:
        raise ValueError(f"loss must be 'chunked' or 'full', got {spec.loss!r}")
    if spec.compile == "loss":
        forward_loss = torch.compile(forward_loss)
    elif spec.compile == "blocks":
        for block in model.layers:
            block.compile()
    elif spec.compile:
        raise ValueError(f"compile must be '', 'loss' or 'blocks', got {spec.compile!r}")
    return model, forward_loss, wrapped


def build(
    spec: Spec,
    shape: Shape,
    folder: str,
    device: torch.device,
    precision: str,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> Contender:
    """Loads one contender from `folder` onto `device`, with its AdamW, ready to step on `batch`."""
    if spec.mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {spec.mode!r}")
    x, y = batch
    torch.manual_seed(0)
    builder = _build_ours if spec.side == "ours" else _build_peer
    model, forward_loss, wrapped = builder(spec, folder, device, precision, x, y)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" if spec.fused_adamw is None else spec.fused_adamw
    optimizer = torch.optim.AdamW(params, lr=LR, fused=fused, foreach=None if fused else True)
    ctx = lambda: autocast_ctx(device, precision)

    def loss_fn() -> torch.Tensor:
        with ctx():
            return forward_loss()

    def step() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    total = sum(p.numel() for p in model.parameters())
    return Contender(spec, model, loss_fn, step, optimizer, sum(p.numel() for p in params), total, wrapped)


_LAYER_LEAF = re.compile(
    r"layers\.(\d+)\.(?:self_attn\.|mlp\.)?(q_proj|k_proj|v_proj|out_proj|o_proj|fc1|fc2|gate_proj|up_proj|down_proj)"
)


def copy_lora_A(peer: Contender, ours: Contender) -> int:
    """Gives ours PEFT's random lora_A (B is zero on both), so both train the same; returns #copied."""
    src = {}
    for name, module in peer.model.named_modules():
        m = _LAYER_LEAF.search(name)
        if m and name.endswith(m.group(0)) and hasattr(module, "lora_A"):
            src[m.groups()] = module.lora_A["default"].weight
    n = 0
    for name in ours.wrapped:
        m = _LAYER_LEAF.search(name)
        if m is None or m.groups() not in src:
            raise ValueError(f"no PEFT adapter for our {name}; PEFT wraps {sorted(src)}")
        with torch.no_grad():
            ours.model.get_submodule(name).lora_A.copy_(src[m.groups()])
        n += 1
    return n
