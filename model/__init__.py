"""A minimal GPT (learned / sinusoidal / RoPE / ALiBi / no positions; GPT-2/OPT-style or Llama-style blocks), its
memory-lean loss, and loading OPT / GPT-2 / Llama / Qwen2 / Mistral / our own checkpoints from local folders, GGUF
files or by Hugging Face model name."""

from .config import GPTConfig
from .gpt import GPT
from .hub import CheckpointNotFoundError, resolve_checkpoint
from .pretrained import from_hf, from_pretrained, save_pretrained

__all__ = [
    "GPTConfig",
    "GPT",
    "from_pretrained",
    "from_hf",
    "save_pretrained",
    "resolve_checkpoint",
    "CheckpointNotFoundError",
]
