"""Tokenizers: a byte-level BPE trained on a corpus (cached), or a checkpoint's own tokenizer.

Byte-level means every byte has a token, so any text (code, unicode, odd whitespace) round-trips exactly:
decode(encode(text)) == text. Documents are joined with an end-of-text token, found by `eot_id`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data.cache import atomic_write, cache_dir, short_hash
from data.corpus import Corpus
from data.gguf_tokenizer import gguf_tokenizer

EOT = "<|endoftext|>"
# End-of-text tokens by family, most specific first: ours and GPT-2, then OPT / LLaMA-style.
EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
# Characters (~bytes for code) of BPE training text: statistics saturate long before; keeps training < 1 min.
TRAIN_MAX_CHARS = 16_000_000


def _new_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # GPT-2's split regex, no prefix space: leading whitespace of code lines is kept byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """Hash of the tokenizer's full JSON (vocab, merges, pre-tokenizer, special tokens)."""
    return short_hash(tok.to_str())


def train_bpe_tokenizer(
    corpus: Corpus, vocab_size: int, max_train_chars: int = TRAIN_MAX_CHARS, verbose: bool = False
) -> Tokenizer:
    """A byte-level BPE with `vocab_size` tokens (EOT is id 0) trained on the first `max_train_chars` characters of
    `corpus` (documents in order), cached under cache_dir()/tokenizers by corpus fingerprint + vocab size."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + end-of-text), got {vocab_size}.")
    path = cache_dir("tokenizers") / f"bpe-{corpus.name}-{corpus.fingerprint}-v{vocab_size}-c{max_train_chars}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    texts, total = [], 0
    for _, text in corpus.docs:
        if total >= max_train_chars:
            break
        texts.append(text[: max_train_chars - total])
        total += len(texts[-1])
    if not texts:
        raise ValueError(f"corpus {corpus.name!r} has no documents to train a tokenizer on.")
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=verbose,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if verbose:
        dt = time.perf_counter() - t0
        print(f"trained a {tok.get_vocab_size()}-token BPE on {total / 1e6:.1f}M characters in {dt:.1f} s")
    atomic_write(path, lambda f: f.write(tok.to_str().encode()))
    return tok


def tokenizer_files(folder: Path) -> list[Path]:
    """The files `load_tokenizer` reads from a checkpoint folder: tokenizer.json, else vocab.json + merges.txt."""
    if (folder / "tokenizer.json").is_file():
        return [folder / "tokenizer.json"]
    pair = [folder / "vocab.json", folder / "merges.txt"]
    if all(f.is_file() for f in pair):
        return pair
    raise FileNotFoundError(
        f"{folder}: no tokenizer.json, nor vocab.json + merges.txt. Copy the checkpoint's "
        "tokenizer files into the folder."
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file, a GGUF file (its `tokenizer.ggml.*` metadata, data.gguf_tokenizer), or a checkpoint
    folder holding `tokenizer.json` or GPT-2 style `vocab.json` + `merges.txt` (OPT, GPT-2). The folder's eos token
    (tokenizer_config.json / special_tokens_map.json) is registered as a special token, so `eot_id` finds it."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return gguf_tokenizer(p)
    folder = p if p.is_dir() else p.parent
    if p.is_file():
        tok = Tokenizer.from_file(str(p))
    elif p.is_dir():
        files = tokenizer_files(p)
        if len(files) == 1:
            tok = Tokenizer.from_file(str(files[0]))
        else:
            tok = _new_bpe()
            tok.model = models.BPE.from_file(*map(str, files))
    else:
        raise FileNotFoundError(f"{p}: no such tokenizer file or folder.")
    eos = _declared_eos(folder)
    if eos is not None and tok.token_to_id(eos) is not None:
        tok.add_special_tokens([AddedToken(eos, special=True)])  # already in the vocab: keeps its id
    return tok


def _declared_eos(folder: Path) -> str | None:
    """The eos token a HF checkpoint folder declares, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            try:
                eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token")
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    return None


def eot_id(tok: Tokenizer) -> int:
    """The end-of-text id: a known name (`<|endoftext|>`, `</s>`, ...) among the special tokens, else in the vocab."""
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for names in ([c for c in EOT_CANDIDATES if c in special], EOT_CANDIDATES):
        for name in names:
            i = tok.token_to_id(name)
            if i is not None:
                return i
    raise ValueError(
        f"No end-of-text token in this tokenizer (looked for {list(EOT_CANDIDATES)}; special tokens: "
        f"{sorted(special)}). Use a tokenizer that defines one."
    )
