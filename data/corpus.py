"""Corpora: named documents with a fingerprint, from built-in sources or the user's files.

A document is one file (or one JSONL line). Built-in corpora come with the interpreter and with
`pip install -r requirements.txt`, so nothing is downloaded:
  pretraining = the Python standard library sources of the running interpreter,
  fine-tuning = numpy's own sources (numpydoc docstrings: a style the stdlib does not have).
The fingerprint hashes every document's name and content (plus the Python / numpy versions for the built-in
ones), so any edited file gives a new fingerprint and thus new tokenizer and token caches.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.cache import short_hash

# Folders never read: test suites (not representative text, and huge in the stdlib), installed packages, caches.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
PRETRAIN_MAX_BYTES = 24_000_000  # a deterministic cap (files in path order) so tokenization stays fast
MAX_NAMED_SKIPS = 5  # how many skipped files a warning lists by name
VERSION_KEYS = ("python", "numpy")  # meta entries that enter the fingerprint


@dataclass
class Corpus:
    """Documents as (name, text) pairs. `skipped` counts inputs left out (non-UTF-8, binary, empty, unreadable)."""

    name: str
    docs: list[tuple[str, str]]
    fingerprint: str
    skipped: int = 0
    meta: dict = field(default_factory=dict)  # versions / source, recorded with results

    @property
    def n_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for _, t in self.docs)

    def info(self) -> dict:
        """What a result row records about its data."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "docs": len(self.docs),
            "bytes": self.n_bytes,
            "skipped": self.skipped,
            **self.meta,
        }


def _fingerprint(docs: list[tuple[str, str]], meta: dict) -> str:
    """Content, not spelling: every name and text, plus the versions of built-in sources (not the path given)."""
    versions = json.dumps({k: meta.get(k) for k in VERSION_KEYS}, sort_keys=True)
    return short_hash(
        versions, *(rel.encode() + b"\0" + hashlib.sha1(text.encode("utf-8")).digest() for rel, text in docs)
    )


def _make(name: str, docs: list[tuple[str, str]], skipped: int, meta: dict) -> Corpus:
    return Corpus(name, docs, _fingerprint(docs, meta), skipped, meta)


def _read_text(path: Path, why: list[str]) -> str | None:
    """The file as UTF-8 text ("" if blank), or None (reason appended to `why`) if binary / not UTF-8 / unreadable."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        why.append(f"{path}: unreadable ({e.strerror})")
        return None
    if b"\0" in raw[:8192]:
        why.append(f"{path}: binary (NUL bytes)")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        why.append(f"{path}: not UTF-8 (byte {e.start})")
        return None
    return text if text.strip() else ""


def _warn_skips(source: str, why: list[str]) -> None:
    if why:
        shown = "; ".join(why[:MAX_NAMED_SKIPS]) + (
            f"; ... ({len(why) - MAX_NAMED_SKIPS} more)" if len(why) > MAX_NAMED_SKIPS else ""
        )
        warnings.warn(f"{source}: skipped {len(why)} file(s): {shown}", stacklevel=3)


def _python_files(root: Path, max_bytes: int | None) -> tuple[list[tuple[str, str]], list[str]]:
    """*.py under `root` outside SKIP_DIRS, sorted by relative path, until `max_bytes` of text. Blank files (empty
    `__init__.py`) carry no text and are dropped without counting as skipped."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune: the stdlib may hold site-packages
        rels += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    docs, why, total = [], [], 0
    for rel in sorted(rels):
        text = _read_text(root / rel, why)
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            break
        docs.append((rel, text))
        total += size
    return docs, why


def builtin_pretrain_corpus(max_bytes: int | None = PRETRAIN_MAX_BYTES) -> Corpus:
    """The running interpreter's standard library (*.py, no test suites), capped at `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, why = _python_files(root, max_bytes)
    if not docs:
        raise RuntimeError(
            f"No Python sources found in the standard library at {root}; this interpreter ships "
            "without them. Point pretrain.corpus to your own text files instead."
        )
    _warn_skips(f"stdlib corpus {root}", why)
    meta = {"source": "python-stdlib", "python": sys.version.split()[0], "max_bytes": max_bytes}
    return _make("stdlib", docs, len(why), meta)


def builtin_finetune_corpus(max_bytes: int | None = None) -> Corpus:
    """numpy's installed sources (*.py, no test suites): numpydoc-style docstrings the stdlib does not have."""
    root = Path(np.__file__).parent
    docs, why = _python_files(root, max_bytes)
    if not docs:
        raise RuntimeError(f"No numpy sources found at {root}. Set data.finetune to your own text files instead.")
    _warn_skips(f"numpy corpus {root}", why)
    docs = [(f"numpy/{rel}", text) for rel, text in docs]
    meta = {
        "source": "numpy-sources",
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "max_bytes": max_bytes,
    }
    return _make("numpy", docs, len(why), meta)


# ----------------------------------------------------------------------------- user data


def _jsonl_docs(path: Path, rel: str, text_field: str) -> list[tuple[str, str]]:
    """One document per non-blank line, named `rel:lineno`."""
    docs = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 (byte {e.start} of the line). Re-encode the file as UTF-8."
                ) from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}). Each line must be one JSON object.") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(
                    f"{where}: no field {text_field!r} (found {keys}). Set data.text_field to the "
                    "field that holds the text."
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string.")
            if text.strip():
                docs.append((f"{rel}:{lineno}", text))
    return docs


def _expand(spec: str) -> tuple[list[Path], Path]:
    """The files a spec names (a file, a folder searched recursively, a glob), and the folder names are relative to."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p], p.absolute().parent
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise ValueError(f"{spec}: the folder has no files. Put text files (any depth) or .jsonl files in it.")
        return files, p.absolute()
    if globlib.has_magic(spec):
        files = sorted(Path(f) for f in globlib.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file())
        if not files:
            raise ValueError(f"{spec}: the pattern matches no files.")
        return files, Path(os.path.commonpath([f.absolute().parent for f in files]))
    raise FileNotFoundError(
        f"{spec}: no such file or folder. Give a text file, a folder, a glob such as "
        "'notes/*.txt', a .jsonl file (one {\"text\": ...} object per line), or 'builtin'."
    )


def load_corpus(spec: str | list[str], text_field: str = "text", builtin: str = "finetune") -> Corpus:
    """A corpus from "builtin" (the `builtin` one: "finetune" = numpy, "pretrain" = stdlib) or from user data:
    text files, folders (recursive; hidden files skipped), globs, or .jsonl files read by `text_field`.

    Binary, non-UTF-8, empty or unreadable text files are skipped with a warning and counted in `skipped`; a JSONL
    problem is an error naming the line. No text at all is an error, never an empty dataset.
    """
    if spec == "builtin" or spec == ["builtin"]:
        if builtin not in ("finetune", "pretrain"):
            raise ValueError(f"builtin must be 'finetune' or 'pretrain', got {builtin!r}.")
        return builtin_finetune_corpus() if builtin == "finetune" else builtin_pretrain_corpus()
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError("No data given: name at least one file, folder, glob or .jsonl file.")
    docs: list[tuple[str, str]] = []
    why: list[str] = []
    for s in specs:
        files, base = _expand(s)
        for f in files:
            rel = Path(os.path.relpath(f.absolute(), base)).as_posix()  # names do not depend on the cwd
            if f.suffix == ".jsonl":
                docs += _jsonl_docs(f, rel, text_field)
            else:
                text = _read_text(f, why)
                if text == "":
                    why.append(f"{f}: empty")
                if text:
                    docs.append((rel, text))
    source = ", ".join(specs)
    if not docs:
        detail = f" Skipped: {'; '.join(why[:MAX_NAMED_SKIPS])}." if why else ""
        raise ValueError(
            f"{source}: no text found.{detail} Give UTF-8 text files or .jsonl lines with "
            f"a non-empty {text_field!r} field."
        )
    _warn_skips(source, why)
    names = [n for n, _ in docs]
    if len(set(names)) != len(names):  # the split hashes names: two documents must never share one
        docs = [(f"{i}:{n}", t) for i, (n, t) in enumerate(docs)]
    name = "user-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(specs[0].rstrip("/*")).name or "data")[:40]
    return _make(name, docs, len(why), {"source": source, "text_field": text_field})


# ----------------------------------------------------------------------------- train / validation split


def _hash_fraction(name: str) -> float:
    """A document's place in [0, 1), from its name only: the split never depends on order or on other files."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


def split_corpus(corpus: Corpus, val_fraction: float) -> tuple[Corpus, Corpus]:
    """(train, val) by document: a document is validation iff sha1(name) as a fraction is < `val_fraction`.

    Edge cases, each with a warning: if the hash leaves one side empty, the document nearest the threshold moves
    over; with a single document, its lines are cut at the line nearest (1 - val_fraction) of its characters —
    the tail is validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    docs = corpus.docs
    if len(docs) == 1:
        train, val = _split_lines(docs[0], val_fraction)
        warnings.warn(
            f"corpus {corpus.name!r} has one document: split by lines, its last {val_fraction:.0%} "
            "is validation. Give several documents for a split by document.",
            stacklevel=2,
        )
    else:
        frac = {n: _hash_fraction(n) for n, _ in docs}
        val_names = {n for n, f in frac.items() if f < val_fraction}
        if not val_names or len(val_names) == len(docs):
            ranked = sorted(frac, key=frac.get)  # the document nearest the threshold changes sides
            side, moved = ("validation", ranked[0]) if not val_names else ("training", ranked[-1])
            val_names = {ranked[0]} if not val_names else set(ranked[:-1])
            warnings.warn(
                f"corpus {corpus.name!r}: the hash split left the {side} set empty; moved {moved!r} "
                "there. Give more documents for a representative split.",
                stacklevel=2,
            )
        train = [d for d in docs if d[0] not in val_names]
        val = [d for d in docs if d[0] in val_names]
    tag = f"{val_fraction!r}"

    def part(split: str, docs: list[tuple[str, str]]) -> Corpus:
        meta = dict(corpus.meta, split=split, val_fraction=val_fraction)
        return Corpus(f"{corpus.name}-{split}", docs, short_hash(corpus.fingerprint, split, tag), corpus.skipped, meta)

    return part("train", train), part("val", val)


def split_tune(train: Corpus, val_fraction: float, tune_fraction: float) -> tuple[Corpus, Corpus]:
    """(train, tune) from the training part of `split_corpus(corpus, val_fraction)`: the tune documents are those
    whose hash fraction lies in [val_fraction, val_fraction + tune_fraction), so they are disjoint from both the
    training documents left and the validation documents, which do not change."""
    rest, tune = split_corpus(train, val_fraction + tune_fraction)
    name = tune.name.removesuffix("-train-val") + "-tune"
    return rest, dataclasses.replace(tune, name=name, meta=dict(tune.meta, split="tune"))


def _split_lines(doc: tuple[str, str], val_fraction: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    name, text = doc
    lines = text.splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError(
            f"The only document, {name!r}, has a single line: nothing to hold out for validation. "
            "Give more documents or more lines."
        )
    ends = np.cumsum([len(line) for line in lines])  # character offset after each line
    cut = int(np.argmin(np.abs(ends[:-1] - (1 - val_fraction) * len(text)))) + 1  # lines[:cut] train, >= 1 each side
    return [(f"{name}#train", "".join(lines[:cut]))], [(f"{name}#val", "".join(lines[cut:]))]
