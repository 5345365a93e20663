"""Hugging Face model names (`facebook/opt-125m`) -> a local checkpoint folder, the way transformers finds them: the
Hugging Face cache first, a download only when offline mode is off and the Hub answers. huggingface_hub does the
work, so HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE mean here what they mean to every other Hugging Face tool."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, validate_repo_id

# What from_pretrained and load_tokenizer read, nothing else: repos also hold TF / Flax / ONNX copies of the weights.
_CONFIG_AND_TOKENIZER = [
    "config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
# Tried in this order, as transformers does: many repos hold both, and older ones (facebook/opt-125m) only .bin.
_WEIGHTS = (
    ["model*.safetensors", "model.safetensors.index.json"],
    ["pytorch_model*.bin", "pytorch_model.bin.index.json"],
)


class CheckpointNotFoundError(FileNotFoundError):
    """A model name that is not a local folder, not in the Hugging Face cache, and cannot be downloaded now."""


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The checkpoint folder for an existing local folder (returned as is) or a Hugging Face model name `org/name`
    (its snapshot folder in the Hugging Face cache, downloaded first when offline mode is off and the Hub is
    reachable). Raises CheckpointNotFoundError for a name that is not cached and cannot be downloaded (naming the
    cache searched and the download command) or that the Hub does not know; a plain FileNotFoundError for text
    that is neither a folder nor shaped like `org/name` (a mistyped path: the Hub is not asked)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or not _is_model_name(name):
        raise FileNotFoundError(
            f"{name!r}: no such folder, nor a Hugging Face model name like facebook/opt-125m. "
            "Give the folder of an OPT / GPT-2 checkpoint (config.json + weights) or an org/name from the Hub."
        )
    try:
        for patterns in _WEIGHTS:
            folder = Path(
                snapshot_download(
                    name, allow_patterns=_CONFIG_AND_TOKENIZER + patterns, local_files_only=constants.HF_HUB_OFFLINE
                )
            )
            if any(any(folder.glob(p)) for p in patterns):
                break
    except LocalEntryNotFoundError as err:
        raise CheckpointNotFoundError(_not_found(name, err)) from err
    except RepositoryNotFoundError as err:  # the Hub answered: a mistyped folder or model name, or a gated model
        raise CheckpointNotFoundError(
            f"{name} is not a local folder, and the Hugging Face Hub has no model of that name (a private or gated "
            "one needs `hf auth login` first)."
        ) from err
    return folder  # a snapshot without weights: from_pretrained names the files it looked for


def _is_model_name(name: str) -> bool:
    """`org/name` as the Hub spells repo ids (a bare `gpt2` is more likely a mistyped folder than a legacy id)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def _not_found(name: str, err: LocalEntryNotFoundError) -> str:
    download = f"`hf download {name}` (older huggingface_hub: `huggingface-cli download {name}`)"
    if constants.HF_HUB_OFFLINE:
        why = f"offline mode is on (HF_HUB_OFFLINE=1). Download it once online with {download}, or unset HF_HUB_OFFLINE"
    else:
        cause = err.__cause__ or err
        why = f"the Hub could not be reached ({type(cause).__name__}: {cause}). Download it once with {download}"
    return (
        f"{name} is not a local folder, and the Hugging Face cache {constants.HF_HUB_CACHE} has no copy of it; {why}. "
        "HF_HUB_CACHE or HF_HOME choose another cache folder."
    )
