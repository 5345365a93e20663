"""What a sweep can know is wrong before any work, checked once: a mistake costs one message and exit code 2,
not a pretrained base, a tokenized corpus and one traceback per run.

The config itself (every key, and the rules between keys) is checked when it is loaded (experiments.config.config).
`preflight` checks what needs more than the config, before the base is pretrained, text is tokenized or a row
is written: the results folder, the base model's folder, its position table and module names (the built-in
base's from its `pretrain:` section, a checkpoint's from its config.json, both built on the meta device, so
nothing is allocated or loaded), and the device. `check_data` reads (never tokenizes) every text of the user's the
runs need and splits it as they will. `check_text` needs tokens: the sweep calls it once the text is tokenized,
still before any run starts or any row is written.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from data import load_corpus, load_tokenizer
from data.cache import ENV_VAR as CACHE_ENV_VAR
from data.cache import cache_root
from data.tokenizer import tokenizer_files
from experiments.base.pretrain import base_gpt_config, is_gguf, pretrain_split
from experiments.config.config import Config
from experiments.config.schema import ConfigError
from experiments.finetune.train import check_context, finetune_splits
from experiments.sweep.plan import RunSpec
from experiments.sweep.results import PLOTS_DIR, REPORT_FILE, RESULTS_CSV, RESULTS_JSONL, RESULTS_LOCK, value_label
from lora import LoRAConfig, inject_lora
from model import GPT, GPTConfig
from model.gguf import read_gguf
from model.pretrained import WEIGHT_FILES, config_from_hf, has_weights, read_config
from training.loop import plan_batches


def preflight(specs: Sequence[RunSpec], out_dir: Path, given: Mapping[str, str] | None = None) -> list[str]:
    """Raise ConfigError for the first problem any of `specs` would meet, naming the command-line input that set
    its key where one did (`given`: key -> "--set train.device=cuda"), else the run; return notes worth printing
    with the plan (a step size that differs from train.batch_tokens)."""
    check_out_dir(out_dir, [s.run_dir(out_dir).parent for s in specs])
    check_cache_dir()
    bases: dict[str, tuple[GPTConfig, str]] = {}
    checked: set[str] = set()
    notes: list[str] = []
    for s in specs:
        cfg = s.cfg
        try:
            if cfg.model.base not in bases:
                bases[cfg.model.base] = base_config(cfg)
            gcfg, label = bases[cfg.model.base]
            _check_device(cfg)
            check_context(cfg, gcfg, label)
            key = repr((gcfg, cfg.lora.target_modules))
            if key not in checked:  # a meta model per distinct (base, targets), not per run
                checked.add(key)
                _check_targets(cfg, gcfg, label)
        except ConfigError as e:  # each message starts with the key it is about
            key = next((k for k in (given or {}) if str(e).startswith(k)), None)
            raise ConfigError(f"{given[key] if given and key else _what(s)}: {e}") from None
        note = _step_note(cfg)
        if note and f"{_what(s)}: {note}" not in notes:
            notes.append(f"{_what(s)}: {note}")
    return notes


def check_out_dir(out_dir: Path, run_folders: Sequence[Path] = ()) -> None:
    """--out must be a folder, or creatable as one, that this process can write in; so must the folders the sweep
    and its report write in (`run_folders`, PLOTS_DIR) where they exist, and the files they rewrite must be files.
    Writing is tried, not read off permission bits: root ignores those, yet an immutable (chattr +i) folder or a
    read-only mount refuses even root."""
    out = Path(out_dir)
    _check_folder(f"--out {out}", out)
    for folder in (*dict.fromkeys(run_folders), out / PLOTS_DIR):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out}: {folder} is a file where the sweep writes a folder; move it away.")
        if folder.is_dir():
            _check_writable(f"--out {out}", folder)
    for name in (RESULTS_JSONL, RESULTS_CSV, RESULTS_LOCK, REPORT_FILE):
        f = out / name
        if f.exists() and not f.is_file():
            raise ConfigError(f"--out {out}: {f} is a folder where the sweep writes a file; move it away.")
        try:
            if f.exists():
                f.open("ab").close()  # opened for appending, nothing written
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write {f} ({e.strerror}). Make it writable.") from None


def check_cache_dir() -> None:
    """The cache (tokenizers, token arrays, the built-in base) must be a folder, or creatable as one, that this
    process can write in: found now, not at the first token array."""
    root = cache_root()
    label = f"${CACHE_ENV_VAR} {root}" if os.environ.get(CACHE_ENV_VAR) else f"the cache {root} (${CACHE_ENV_VAR})"
    _check_folder(label, root)


def _check_folder(label: str, folder: Path) -> None:
    """`folder` (named `label` in messages) must be a folder, or creatable as one, that this process can write in."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{label} is a file, not a folder. Give a folder (it is created if missing).")
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{label}: {existing} is a file, so no folder can be made under it.")
    _check_writable(label, existing)


def _check_writable(label: str, folder: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(
            f"{label}: cannot write in {folder} ({e.strerror}). Give a folder you can write to."
        ) from None


def base_config(cfg: Config) -> tuple[GPTConfig, str]:
    """The base model's GPTConfig and a label for messages: the built-in base's from the `pretrain:` section, as
    experiments.base.pretrain builds it (its position table ends at the longest pretraining phase; vocab_size is the
    asked size, which only the tokenizer can lower), a checkpoint's from its config.json, as
    model.from_pretrained maps it. A checkpoint folder must also hold weights and a readable tokenizer; neither
    is loaded beyond that."""
    if cfg.model.base == "builtin":
        return base_gpt_config(cfg.pretrain, cfg.pretrain.vocab_size), "the built-in base (pretrain: section)"
    folder = Path(cfg.model.base)
    if is_gguf(folder):
        return _gguf_config(folder)
    try:
        model_type, gcfg = read_config(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.base: {e}") from None
    if not has_weights(folder):
        raise ConfigError(f"model.base: {folder} has no weights; expected one of {', '.join(WEIGHT_FILES)}.")
    try:
        files = tokenizer_files(folder)
    except FileNotFoundError as e:
        raise ConfigError(f"model.base: {e}") from None
    try:
        load_tokenizer(folder)
    except Exception as e:  # the tokenizers library raises its own plain Exception for a broken file
        names = " + ".join(str(f) for f in files)
        raise ConfigError(f"model.base: {names} cannot be read as a tokenizer ({e}).") from None
    return gcfg, f"{folder} ({model_type})"


def _gguf_config(path: Path) -> tuple[GPTConfig, str]:
    """A GGUF base's GPTConfig from its metadata (nothing dequantized), and its tokenizer built as the runs build it:
    a file of an unsupported architecture, quantization or tokenizer fails here, not in every run."""
    try:
        hf, _ = read_gguf(path, tensors=False)
        model_type, gcfg = config_from_hf(hf, str(path))
        load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.base: {e}") from None
    return gcfg, f"{path} ({model_type} GGUF)"


def check_data(specs: Sequence[RunSpec], given: Mapping[str, str] | None = None) -> None:
    """Read every text of the user's that `specs` train or evaluate on (data.finetune, eval.source_data, and the
    built-in base's pretrain.corpus) and split it as the runs will, before any tokenizer is trained, text tokenized
    or base pretrained: a file without usable text (empty, binary, not UTF-8, .jsonl lines without the text field)
    or a single line with nothing to hold out costs one message, not minutes of work. The built-in corpora are
    not read. `given` maps a key to the command-line input that set it ("data.finetune" -> "--data notes.txt"),
    which the message names; a key a config file set is named with its run."""
    seen: set[str] = set()
    for s in specs:
        for key, ident, read in _user_texts(s.cfg):
            if ident in seen:
                continue
            seen.add(ident)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # skipped files, a one-document split: the run itself says them
                    read()
            except (OSError, ValueError) as e:
                source = (given or {}).get(key) or f"{_what(s)}: '{key}'"
                raise ConfigError(f"{source}: {e}") from None


def _user_texts(cfg: Config) -> list[tuple[str, str, Callable[[], object]]]:
    """(key, identity of what is read, the read) for each text of the user's that a run of `cfg` reads."""
    d, out = cfg.data, []
    if d.finetune != "builtin":
        ident = repr(("finetune", d.finetune, d.text_field, d.val_fraction, d.tune_fraction))
        out.append(("data.finetune", ident, lambda: finetune_splits(cfg)))
    source = cfg.eval.source_data
    if source is not None and source != "builtin":
        out.append(
            ("eval.source_data", repr(("source", source, d.text_field)), lambda: load_corpus(source, d.text_field))
        )
    corpus = cfg.pretrain.corpus
    if cfg.model.base == "builtin" and corpus != "builtin":
        ident = repr(("pretrain", corpus, d.text_field))
        out.append(("pretrain.corpus", ident, lambda: pretrain_split(load_corpus(corpus, d.text_field))))
    return out


def check_text(s: RunSpec, n_train: int, n_val: int) -> None:
    """The tokenized fine-tuning text (n_train, n_val tokens) must hold one context window and its next-token
    target in each of its two splits."""
    seq, d = s.cfg.model.max_position_embeddings, s.cfg.data
    for split, n, fix in (
        ("training", n_train, "give more text or use a shorter context (model.max_position_embeddings)"),
        ("validation", n_val, f"raise data.val_fraction (now {d.val_fraction}) or give more documents"),
    ):
        if n < seq + 1:
            raise ConfigError(
                f"{_what(s)}: the {split} split of data.finetune ({d.finetune}) has {n} tokens, fewer than one "
                f"context window of {seq} tokens plus its next-token target; {fix}."
            )


def _what(s: RunSpec) -> str:
    return f"{s.ablation} {s.key}={value_label(s.value)}" if s.key else s.ablation


def _check_device(cfg: Config) -> None:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is cuda, but torch {torch.__version__} sees no CUDA device (built for CUDA "
            f"{torch.version.cuda or 'none'}). Use train.device=auto or cpu, or install a CUDA build of torch."
        )


def _check_targets(cfg: Config, gcfg: GPTConfig, label: str) -> None:
    """Inject into the base's module tree on the meta device: the same matching (and errors) as the run's."""
    with torch.device("meta"):
        model = GPT(gcfg)
    try:
        inject_lora(model, LoRAConfig(rank=cfg.lora.rank, target_modules=list(cfg.lora.target_modules)))
    except ValueError as e:
        raise ConfigError(f"lora.target_modules on {label}: {e}") from None


def _step_note(cfg: Config) -> str | None:
    """Steps hold whole sequences (and, under torchrun, equal shares per process): say when that moves the
    tokens per step away from train.batch_tokens, rather than change the budget silently."""
    t, seq = cfg.train, cfg.model.max_position_embeddings
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_batches(t.tokens, t.batch_tokens, t.micro_batch_tokens, seq, world)
    if plan.tokens_per_step == t.batch_tokens:
        return None
    return (
        f"{plan.tokens_per_step:,} tokens per optimizer step, not train.batch_tokens={t.batch_tokens:,} "
        f"({plan.accum} x {plan.micro_seqs} whole {seq}-token sequences"
        + (f" over {world} processes" if world > 1 else "")
        + f"); {plan.steps} steps, {plan.tokens:,} training tokens"
    )
