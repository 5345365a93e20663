"""Position tables and their application: sinusoidal (Vaswani et al. 2017), RoPE (Su et al. 2021, rotate-half
layout), ALiBi (Press et al. 2022). Pure functions; the GPT caches their outputs as non-persistent buffers."""

from __future__ import annotations

import math

import torch


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """(n_positions, dim) float32: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same angle)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angle = pos * inv_freq  # (P, dim/2)
    table = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)  # interleave sin, cos
    return table.float()


def rope_tables(
    n_positions: int, rotary_dim: int, base: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_positions, rotary_dim) float32, rotate-half layout: frequency i sits at dims i
    and i + rotary_dim/2 (the GPT-NeoX / Llama convention). `scaling`: GPTConfig.rope_scaling (llama3)."""
    inv_freq = rope_inv_freq(rotary_dim, base, scaling)
    angle = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq  # (P, rot/2)
    angle = torch.cat((angle, angle), dim=-1)  # (P, rot)
    return angle.cos().float(), angle.sin().float()


def rope_inv_freq(rotary_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """(rotary_dim/2,) float64 angular frequencies base^(-2i/rotary_dim), llama3-scaled when `scaling` says so."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    return inv_freq if scaling is None else llama3_inv_freq(inv_freq, scaling)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency scaling: wavelengths shorter than original_max / high_freq_factor stay, those
    longer than original_max / low_freq_factor are divided by `factor`, and the band between is interpolated
    smoothly, so the model serves contexts `factor` times longer than it was pretrained on."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)  # in [0, 1] inside the band where it is used
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(
        wavelen < old_len / high, inv_freq, torch.where(wavelen > old_len / low, inv_freq / factor, scaled)
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, T, H, head_dim) by position; cos/sin are (T, 1, rot).
    Dims past rot (partial rotary) pass through unchanged."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's halves: multiplying by sin completes the 2-D rotation."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """(n_head,) float32 slopes from the ALiBi paper: the geometric sequence 2^(-8/n)^(1..n) for n a power of
    two; otherwise the slopes of the nearest lower power of two m, then every other slope of 2m."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(m)
    if m < n_head:
        slopes += power_of_two(2 * m)[0::2][: n_head - m]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, n_positions: int) -> torch.Tensor:
    """(H, P, P) float32 additive attention bias: -slope * (i - j) for key j <= query i, -inf above the
    diagonal (so it is also the causal mask). Relative form keeps values near 0 for recent keys, which
    survives a bf16 cast better than the shift-equivalent slope * j."""
    pos = torch.arange(n_positions, device=slopes.device)
    rel = (pos[None, :] - pos[:, None]).float()  # (P, P): j - i
    bias = slopes[:, None, None] * rel  # (H, P, P)
    return bias.masked_fill(rel > 0, float("-inf"))
