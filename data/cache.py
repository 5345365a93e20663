"""Where cached artifacts live, and the one way they are written: atomically.

Everything under the cache dir is derived from fingerprints, so a file is either complete or absent: a writer
that dies half-way leaves only a `*.tmp` file that no reader ever opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ENV_VAR = "SLM_LORA_CACHE"


def cache_root() -> Path:
    """`$SLM_LORA_CACHE` or `~/.cache/slm-lora`, not created (the sweep checks it can be before any work)."""
    return Path(os.environ.get(ENV_VAR) or "~/.cache/slm-lora").expanduser()


def cache_dir(sub: str | None = None) -> Path:
    """`$SLM_LORA_CACHE` or `~/.cache/slm-lora` (created), or its subfolder `sub`."""
    root = cache_root()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temp file in `path`'s folder, then rename it onto `path` (os.replace is atomic).

    The temp file is created with mode 0o666 and the process umask applied, like any `open(path, "w")`:
    `tempfile.mkstemp` would make every cache and results file 0600, unreadable to the rest of a group.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON through `atomic_write`: readers never see half a file."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def short_hash(*parts: str | bytes) -> str:
    """16 hex digits of sha256 over the parts, NUL-separated so ("a", "bc") != ("ab", "c"). Every content key of
    the project (configs, studies, corpora, tokenizers, token caches, bases) is one of these."""
    h = hashlib.sha256()
    for i, part in enumerate(parts):
        if i:
            h.update(b"\0")
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:16]


def json_hash(obj: Any) -> str:
    """`short_hash` of a JSON-able object, independent of dict order."""
    return short_hash(json.dumps(obj, sort_keys=True, default=str))
