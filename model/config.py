"""GPTConfig: every knob of the GPT, validated up front so a bad value fails before any tensor is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head among the divisors of d_model"
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
        if self.word_embed_proj_dim is not None and self.word_embed_proj_dim <= 0:
            raise ValueError(f"GPTConfig.word_embed_proj_dim must be positive or None, got {self.word_embed_proj_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**d)
