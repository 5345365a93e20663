"""Causal self-attention with separate q/k/v/out projections (so LoRA can target each by name), RoPE applied
in place of a table, and an optional KV cache for generation. All attention math goes through SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig
from .positions import apply_rope


class KVCache:
    """Keys/values of past tokens for incremental decoding, preallocated once per layer as
    (B, H, max_len, head_dim) so each step writes in place instead of concatenating."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens already cached (same for every layer)
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at positions [length, length + T); return all cached (B, H, length + T, D)."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; writing up to position {end} overflows it")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.attn_dropout = config.attn_dropout
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.out_proj = nn.Linear(d, d, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: (T, 1, rot)
        attn_mask: torch.Tensor | None = None,  # ALiBi bias (H, T, S) float, or (T, S) bool; None -> causal
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, d = x.shape
        # (B, T, H, D) views: RoPE works on this layout, then transpose to SDPA's (B, H, T, D) as a stride change
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope[0], rope[1]), apply_rope(k, rope[0], rope[1])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, D), S = cached + T
        # No mask and T == S: plain causal, which lets SDPA pick flash / memory-efficient kernels. One query
        # against a cache (T=1 < S) sees every key, so it needs neither mask nor is_causal.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=attn_mask is None and T == k.shape[2] and T > 1,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, d)
        return self.out_proj(y)
