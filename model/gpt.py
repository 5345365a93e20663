"""The GPT: token embeddings (+ learned / sinusoidal positions, or RoPE / ALiBi inside attention), a stack of
pre-LN (or post-LN) blocks, final norm, lm_head. Leaf names match the checkpoint family's (OPT: q_proj ... out_proj,
fc1, fc2; Llama: q_proj ... o_proj, mlp.gate_proj/up_proj/down_proj) so LoRA targets and PEFT adapters line up."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import CausalSelfAttention, KVCache
from .config import GPTConfig
from .loss import chunked_cross_entropy
from .positions import alibi_bias, alibi_slopes, rope_tables, sinusoidal_table

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), no bias (Llama). Computed in float32 for lower-precision inputs and
    cast back before the weight, as transformers does; a float64 input stays float64 (transformers would round
    it to float32), so float64 checks stay exact."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)): the Llama-family MLP (act = SiLU there)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        bias = config.part_bias("mlp_bias")
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=bias)
        self.act = _ACTIVATIONS[config.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


class Block(nn.Module):
    """One transformer layer. Pre-LN: x + f(norm(x)). Post-LN (OPT-350m): norm(x + f(x)). The MLP is
    fc1/act/fc2 (OPT names) or, with config.mlp == "gated", `mlp` holding gate/up/down_proj (Llama names)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.pre_norm, self.gated = config.pre_norm, config.gated
        self.attn_norm = _norm(config, config.d_model)
        self.self_attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = _norm(config, config.d_model)
        if config.gated:
            self.mlp = GatedMLP(config)
        else:
            bias = config.part_bias("mlp_bias")
            self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=bias)
            self.act = _ACTIVATIONS[config.activation]()
            self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) if self.gated else self.fc2(self.act(self.fc1(x)))

    def forward(self, x, rope=None, attn_mask=None, cache=None):
        if self.pre_norm:
            x = x + self.dropout(self.self_attn(self.attn_norm(x), rope, attn_mask, cache))
            return x + self.dropout(self._mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.self_attn(x, rope, attn_mask, cache)))
        return self.mlp_norm(x + self.dropout(self._mlp(x)))


class GPT(nn.Module):
    """Decoder-only LM. forward -> logits; loss -> chunked CE (no full logits); generate -> KV-cached decoding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        self.tokenizer_path: str | None = None  # set by from_pretrained when the folder has tokenizer.json
        # Where our top-level modules (layers, project_in, ...) sit in the source checkpoint's own module tree
        # ("model.decoder." for OPT), so adapter files can name modules the way PEFT on transformers does.
        self.hf_module_prefix = ""
        e, d = config.embed_dim, config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, e)
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        kind = config.position_embedding
        if kind == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings + config.position_offset, d)
        self.register_tables()
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = _norm(config, d) if config.final_norm else None
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None
        self.lm_head = nn.Linear(e, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def register_tables(self) -> None:
        """(Re)build the position tables on the current default device: derived, not learned, they are
        non-persistent buffers that follow .to() but stay out of state_dict (a model built on the meta device
        calls this again once its weights are real)."""
        cfg, kind = self.config, self.config.position_embedding
        if kind == "sinusoidal":
            table = sinusoidal_table(cfg.max_position_embeddings, cfg.d_model)
            self.register_buffer("sinusoidal", table, persistent=False)
        if kind == "rope":
            cos, sin = rope_tables(cfg.max_position_embeddings, cfg.rotary_dim, cfg.rope_base, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)  # (P, rot)
            self.register_buffer("rope_sin", sin, persistent=False)
        if kind == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head), persistent=False)  # (H,)
            self.register_buffer("alibi", torch.empty(0), persistent=False)  # (H, P, P), built on first use

    def _init_weights(self) -> None:
        """GPT-2 / nanoGPT: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 n_layer) so the
        residual stream's variance does not grow with depth; biases zero, LayerNorm identity."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.layers:
            out, down = (
                (block.self_attn.o_proj, block.mlp.down_proj)
                if self.config.gated
                else (block.self_attn.out_proj, block.fc2)
            )
            nn.init.normal_(out.weight, mean=0.0, std=std)
            nn.init.normal_(down.weight, mean=0.0, std=std)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied head counts once), as transformers' num_parameters()."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ positions

    def _position_inputs(self, x: torch.Tensor, start: int):
        """For T new tokens at absolute positions [start, start + T): add table positions to x, or return the
        RoPE (cos, sin) / ALiBi bias the attention needs. Tables are sliced, never rebuilt, on the common path."""
        T, end, cfg = x.shape[1], start + x.shape[1], self.config
        kind, limit = cfg.position_embedding, cfg.max_seq_len
        rope = attn_mask = None
        if limit is not None and end > limit:
            raise ValueError(
                f"sequence length {end} exceeds max_position_embeddings={limit} of '{kind}' positions: feed at most "
                f"{limit} tokens (a pretrained checkpoint's table is fixed), or build the model with a larger "
                f"max_position_embeddings or rope/alibi/none"
            )
        self._grow_tables(end)
        if kind == "learned":
            off = cfg.position_offset
            x = x + self.embed_positions.weight[start + off : end + off]
        elif kind == "sinusoidal":
            x = x + self.sinusoidal[start:end]
        elif kind == "rope":
            rope = self.rope_cos[start:end, None], self.rope_sin[start:end, None]  # (T, 1, rot)
        elif kind == "alibi":
            attn_mask = self.alibi[:, start:end, :end]  # (H, T, S)
        window = cfg.sliding_window
        if window is not None and end > window:  # query i sees keys j with i - window < j <= i
            i = torch.arange(start, end, device=x.device)[:, None]
            j = torch.arange(end, device=x.device)[None, :]
            allowed = (j <= i) & (j > i - window)  # (T, S)
            attn_mask = allowed if attn_mask is None else attn_mask.masked_fill(~allowed, float("-inf"))
        elif attn_mask is None and start > 0 and T > 1:  # a chunk after cached tokens: causal, offset by start
            attn_mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        return x, rope, attn_mask

    def _grow_tables(self, n: int) -> None:
        """RoPE / ALiBi run at any length: rebuild their tables when a longer sequence arrives (rare)."""
        kind = self.config.position_embedding
        if kind == "rope" and self.rope_cos.shape[0] < n:
            cfg = self.config
            cos, sin = rope_tables(max(n, 2 * self.rope_cos.shape[0]), cfg.rotary_dim, cfg.rope_base, cfg.rope_scaling)
            self.rope_cos = cos.to(self.rope_cos)
            self.rope_sin = sin.to(self.rope_sin)
        elif kind == "alibi" and self.alibi.shape[-1] < n:
            self.alibi = alibi_bias(self.alibi_slopes.float(), n).to(self.alibi_slopes)

    # ------------------------------------------------------------------ forward

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, embed_dim): the lm_head's input (after the final norm / project_out)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        start = cache.length if cache is not None else 0
        x = self.embed_tokens(input_ids)  # (B, T, e)
        if self.project_in is not None:
            x = self.project_in(x)  # (B, T, d)
        x, rope, attn_mask = self._position_inputs(x, start)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if use_checkpoint:
                x = checkpoint(block, x, rope, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(input_ids))

    def loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, chunk_size: int | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy; targets (B, T) are already shifted (targets[:, t] follows
        input_ids[:, t]). Never materializes the full (B*T, vocab) logits: see model/loss.py."""
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        h = self.hidden_states(input_ids)
        return chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), chunk_size, ignore_index)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to input_ids (B, T) using a KV cache. temperature=0 is
        greedy (argmax). Once a row emits eos_token_id it is padded with eos; stops early when all rows have.
        Call model.eval() first if the model has dropout."""
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k <= 0):
            raise ValueError(
                f"need max_new_tokens >= 0, temperature >= 0, top_k > 0 or None; got "
                f"{max_new_tokens}, {temperature}, {top_k}"
            )
        B, T0 = input_ids.shape
        total = T0 + max_new_tokens
        kind, limit = self.config.position_embedding, self.config.max_seq_len
        if limit is not None and total > limit:
            raise ValueError(
                f"prompt {T0} + max_new_tokens {max_new_tokens} = {total} exceeds "
                f"max_position_embeddings={limit} of '{kind}' positions; shorten the prompt or lower max_new_tokens "
                f"so that they sum to at most {limit}"
            )
        self._grow_tables(total)  # once, instead of step by step
        cache = KVCache(self.config.n_layer, total)
        out = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        step_ids = input_ids
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden_states(step_ids, cache)[:, -1])  # (B, V): last position only
            step_ids = _sample(logits, temperature, top_k)  # (B, 1)
            if eos_token_id is not None:
                step_ids = step_ids.masked_fill(finished[:, None], eos_token_id)
                finished |= step_ids[:, 0] == eos_token_id
            out.append(step_ids)
            if eos_token_id is not None and bool(finished.all()):  # one host sync per step, only with eos
                break
        return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
