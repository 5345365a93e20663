"""Causal self-attention with separate q/k/v/output projections (so LoRA can target each by name), RoPE applied
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
    """q/k/v and output projections around SDPA. The output projection is `o_proj` in a Llama-style block
    (config.mlp == "gated"), `out_proj` otherwise. With n_kv_head < n_head (grouped-query attention) k_proj/v_proj
    produce n_kv_head heads, each shared by n_head / n_kv_head query heads, and the KV cache holds only those."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, hd
        self.layer_idx = layer_idx
        self.attn_dropout = config.attn_dropout
        qkv_bias = config.part_bias("attn_bias")
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=qkv_bias)
        self.out_name = "o_proj" if config.gated else "out_proj"
        o_bias = config.part_bias("o_bias")
        self.add_module(self.out_name, nn.Linear(self.n_head * hd, d, bias=o_bias))

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: (T, 1, rot) float32 tables
        attn_mask: torch.Tensor | None = None,  # ALiBi bias (H, T, S) float32, or (T, S) bool; None -> causal
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        # (B, T, H, D) views: RoPE works on this layout, then transpose to SDPA's (B, H, T, D) as a stride change
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, KV, D)
        v = self.v_proj(x).view(B, T, KV, D)
        if rope is not None:  # tables cast to q's dtype: the Linears' compute dtype, under autocast too
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # ALiBi: SDPA wants q's dtype; a no-op without autocast
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, D), S = cached + T
        # No mask and T == S: plain causal, which lets SDPA pick flash / memory-efficient kernels. One query
        # against a cache (T=1 < S) sees every key, so it needs neither mask nor is_causal.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=attn_mask is None and T == k.shape[2] and T > 1,
            **({"enable_gqa": True} if KV != H else {}),  # query head h reads key/value head h // (H / KV)
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return getattr(self, self.out_name)(y)
