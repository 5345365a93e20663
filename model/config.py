"""GPTConfig: every knob of the GPT, validated up front so a bad value fails before any tensor is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
TABLE_POSITIONS = ("learned", "sinusoidal")  # position kinds with a fixed-size table: a hard length limit
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("standard", "gated")
ROPE_SCALINGS = ("llama3",)
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    max_position_embeddings: int = 512
    position_embedding: str = "rope"
    dropout: float = 0.0  # residual dropout (after out_proj and fc2)
    bias: bool = True  # biases in every Linear of the blocks (never in lm_head)
    activation: str = "gelu"
    tie_embeddings: bool = True
    # --- what loading OPT / GPT-2 checkpoints needs ---
    attention_dropout: float | None = None  # dropout on attention probabilities; None -> same as `dropout`
    pre_norm: bool = True  # False: post-LN blocks (OPT-350m)
    final_norm: bool = True  # LayerNorm after the last block (OPT-350m has none)
    layer_norm_eps: float = 1e-5
    position_offset: int = 0  # learned table index = position + offset (OPT: 2)
    rope_base: float = 10000.0
    rotary_fraction: float = 1.0  # share of each head's dims that RoPE rotates (rest pass through)
    word_embed_proj_dim: int | None = None  # != d_model: embeddings live in this width, with project_in/out
    gradient_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)
    # --- what Llama-family checkpoints (Llama, Qwen2, Mistral) need; the defaults are the GPT-2/OPT-style block ---
    norm: str = "layernorm"  # "rmsnorm": weight-only RMSNorm, computed in at least float32; eps is layer_norm_eps
    # "gated": a Llama-style block: mlp.{gate,up,down}_proj computing down(act(gate(x)) * up(x)), attention output
    # self_attn.o_proj. "standard": fc2(act(fc1(x))) and self_attn.out_proj, as OPT names them.
    mlp: str = "standard"
    n_kv_head: int | None = None  # grouped-query attention: key/value heads, each shared by n_head / n_kv_head queries
    # width of one head; None -> d_model // n_head, resolved when the config is built (so dataclasses.replace of
    # d_model or n_head keeps the old width: pass head_dim=None along)
    head_dim: int | None = None
    attn_bias: bool | None = None  # biases of q/k/v_proj (Qwen2: True with bias=False); None -> `bias`
    o_bias: bool | None = None  # bias of the attention output projection; None -> `bias`
    mlp_bias: bool | None = None  # biases of the MLP's Linears; None -> `bias`
    # RoPE frequency scaling, {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (Llama 3.1 / 3.2); None: plain RoPE with rope_base
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # each token attends to the last `sliding_window` tokens only (Mistral)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        for name in ("n_kv_head", "head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"GPTConfig.{name} must be a positive int or None, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.n_head != 0:
                raise ValueError(
                    f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); "
                    f"pick n_head among the divisors of d_model, or set head_dim"
                )
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.kv_heads != 0:
            raise ValueError(
                f"GPTConfig.n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}): each key/value "
                f"head serves an equal group of query heads; pick n_kv_head among the divisors of n_head"
            )
        for name, allowed in (("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"GPTConfig.{name}={getattr(self, name)!r} is unknown; choose one of {', '.join(allowed)}"
                )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"GPTConfig.position_embedding={self.position_embedding!r} is unknown; "
                f"choose one of {', '.join(POSITION_EMBEDDINGS)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation={self.activation!r} is unknown; choose one of {', '.join(ACTIVATIONS)}"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {value}")
        if self.position_offset < 0:
            raise ValueError(f"GPTConfig.position_offset must be >= 0, got {self.position_offset}")
        if self.position_embedding == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.position_embedding == "rope":
            if not 0.0 < self.rotary_fraction <= 1.0:
                raise ValueError(f"GPTConfig.rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
            if self.rotary_dim < 2:
                raise ValueError(
                    f"rotary_fraction={self.rotary_fraction} of head_dim {self.head_dim} rotates fewer than 2 dims; "
                    f"raise rotary_fraction"
                )
            if self.rope_base <= 1.0:
                raise ValueError(f"GPTConfig.rope_base must be > 1, got {self.rope_base}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        if self.word_embed_proj_dim is not None and self.word_embed_proj_dim <= 0:
            raise ValueError(f"GPTConfig.word_embed_proj_dim must be positive or None, got {self.word_embed_proj_dim}")

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if self.position_embedding != "rope":
            raise ValueError(f"GPTConfig.rope_scaling applies to rope positions, not {self.position_embedding!r}")
        if not isinstance(scaling, dict):
            raise ValueError(f"GPTConfig.rope_scaling must be a dict or None, got {scaling!r}")
        kind = scaling.get("rope_type")
        if kind not in ROPE_SCALINGS:
            raise ValueError(
                f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_SCALINGS)} "
                f"(or no rope_scaling for plain RoPE)"
            )
        missing = [k for k in LLAMA3_KEYS if k not in scaling]
        unknown = sorted(set(scaling) - {"rope_type", *LLAMA3_KEYS})
        if missing or unknown:
            raise ValueError(
                f"llama3 rope_scaling needs exactly the keys {', '.join(LLAMA3_KEYS)}; "
                f"missing {missing}, unknown {unknown}"
            )
        bad = [k for k in LLAMA3_KEYS if isinstance(scaling[k], bool) or not isinstance(scaling[k], (int, float))]
        if bad or any(scaling[k] <= 0 for k in LLAMA3_KEYS):
            raise ValueError(f"llama3 rope_scaling values must be positive numbers, got {scaling}")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ValueError(
                f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
                f"{scaling['high_freq_factor']} <= {scaling['low_freq_factor']}"
            )

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head without grouped-query attention."""
        return self.n_kv_head or self.n_head

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence the positions can serve: the table's size for learned / sinusoidal positions,
        None (no limit) for rope / alibi / none."""
        return self.max_position_embeddings if self.position_embedding in TABLE_POSITIONS else None

    @property
    def gated(self) -> bool:
        """A Llama-style block (gated MLP, `o_proj`): module names follow it."""
        return self.mlp == "gated"

    @property
    def rotary_dim(self) -> int:
        """Dims of each head RoPE rotates: an even number, the rest pass through unchanged."""
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    @property
    def embed_dim(self) -> int:
        """Width of token embeddings and of lm_head's input (d_model unless OPT-350m-style projections)."""
        return self.word_embed_proj_dim or self.d_model

    @property
    def attn_dropout(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    def part_bias(self, flag: Literal["attn_bias", "o_bias", "mlp_bias"]) -> bool:
        """Whether one part's Linears have biases: its own flag ("attn_bias" for q/k/v, "o_bias", "mlp_bias"), or
        `bias` where that flag is None (GPT-2/OPT: one switch; Qwen2: q/k/v only)."""
        own = getattr(self, flag)
        return self.bias if own is None else own

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**d)
