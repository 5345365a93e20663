"""A minimal GPT (learned / sinusoidal / RoPE / ALiBi / no positions), its memory-lean loss, and loading
OPT / GPT-2 / our own checkpoints from local folders or by Hugging Face model name."""

from .config import GPTConfig
from .gpt import GPT
from .hub import CheckpointNotFoundError, resolve_checkpoint
from .pretrained import from_pretrained, save_pretrained

__all__ = ["GPTConfig", "GPT", "from_pretrained", "save_pretrained", "resolve_checkpoint", "CheckpointNotFoundError"]
