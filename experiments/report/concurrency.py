"""Under what concurrency a study's train times were measured. Runs that share a machine (`--jobs N` on CPU, several
runs per GPU) take longer than a run alone, so their times compare only with times measured under the same
concurrency; the report says which that was, and warns where a study mixes them."""

from __future__ import annotations

from collections import Counter


def concurrency_note(rows: list[dict]) -> str | None:
    """One line for a study's header from its finished rows' `concurrency` column; None for rows written before the
    column existed (their concurrency is unknown, and older reports read as they did)."""
    counts = Counter(r.get("concurrency") for r in rows if r.get("status") == "ok")
    known = {c: n for c, n in counts.items() if c is not None}
    if not known:
        return None
    unknown = counts.get(None, 0)
    parts = [f"{_runs(c)}: {n} run{'s' if n > 1 else ''}" for c, n in sorted(known.items())]
    if unknown:
        parts.append(f"unknown (older rows): {unknown} run{'s' if unknown > 1 else ''}")
    if len(known) == 1 and not unknown:
        (c,) = known
        alone = " (each run had the machine to itself)" if c == 1 else ": times include sharing the machine"
        return f"- train time measured with {_runs(c)}{alone}"
    return (
        f"- **train times were measured under different concurrency** ({'; '.join(parts)}): a time measured beside "
        "other runs is longer than one measured alone, so compare train times only between runs of equal concurrency"
    )


def _runs(c: int) -> str:
    return "1 run at a time" if c == 1 else f"up to {c} runs at once"
