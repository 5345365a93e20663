"""The result row: one typed definition (`Row`) of every column of the results file, and of what one fine-tuning
run reports (the columns marked `run=True`, written to RUN_DIR/result.json when the run ends).

Everything about a column is said once, here: its name, type, unit, meaning and when it is empty. From `Row` come
the run's result keys (RESULT_KEYS), the results file's column order (COLUMNS), the keys every row must have
(ROW_IDENTITY), the reader's checks (`row_problems`) and the README's column table
(`python -m experiments.report.columns`). It lives with the one run, the lowest stage that writes it; the sweep
(`experiments.sweep.results`) adds the columns that say which run of which study a row is.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypedDict

RESULT_FILE = "result.json"  # in a run folder: what the run reported (RESULT_KEYS), written when it ends


class Col(NamedTuple):
    """What a column holds. `empty` says when the cell is empty (null in JSON, blank in the CSV; never 0)."""

    unit: str  # "" for names, labels and flags
    meaning: str
    empty: str = ""  # when the cell is empty; "" for a column every row fills
    run: bool = False  # written by the training run (result.json); else by the sweep that ran it
    identity: bool = False  # every row has it: a line without it was not written by a sweep


FAILED = "empty when the run did not finish ok"
NO_CUDA = "empty on CPU"
NO_PROCESS = "empty when the run's training process never started"


class Row(TypedDict, total=False):
    """One line of results.jsonl (and of results.csv), in column order. Rows of older versions may lack columns
    added since; only the identity columns are in every row."""

    finished_at: Annotated[str, Col("ISO time, UTC", "when the row was written")]
    ablation: Annotated[str, Col("", "the study: its config's ablation name", identity=True)]
    key: Annotated[
        str,
        Col(
            "",
            "the swept dotted key (`lora.rank`); a grid's keys joined by ` × `; empty string without an ablation",
            identity=True,
        ),
    ]
    value: Annotated[
        Any,
        Col(
            "",
            "this run's value of the swept key (lists as `q_proj,v_proj`); a grid's cell: its values joined by ` × `",
            "empty without an ablation",
            identity=True,
        ),
    ]
    value_index: Annotated[
        int | None,
        Col(
            "",
            "the value's position in the config's list of values (a grid's cell: in the row-major product)",
            "empty for a value given on the command line",
        ),
    ]
    is_baseline: Annotated[bool, Col("", "whether the value is the study's baseline")]
    seed: Annotated[int, Col("", "`train.seed` of this run: the data order and LoRA's initial A", identity=True)]
    status: Annotated[
        str, Col("", "`ok`, `diverged` (non-finite loss), `oom` (out of memory) or `failed`", run=True, identity=True)
    ]
    error: Annotated[str | None, Col("", "why a run failed or ran out of memory", "empty when it did not", run=True)]
    diverged_step: Annotated[
        int | None, Col("optimizer steps", "the step whose loss was not finite", "empty unless diverged", run=True)
    ]
    val_loss: Annotated[
        float | None,
        Col(
            "nats/token",
            "mean cross-entropy of the fine-tuned model on the held-out validation tokens",
            FAILED,
            run=True,
        ),
    ]
    val_ppl: Annotated[float | None, Col("", "validation perplexity, exp(val_loss)", FAILED, run=True)]
    best_val_loss: Annotated[
        float | None,
        Col(
            "nats/token",
            "the lowest over intermediate evaluations (`eval.every_steps`), else the final one",
            FAILED,
            run=True,
        ),
    ]
    best_val_ppl: Annotated[float | None, Col("", "exp(best_val_loss)", FAILED, run=True)]
    base_val_loss: Annotated[
        float | None,
        Col(
            "nats/token",
            "the same validation tokens at the same context before fine-tuning (the base model)",
            "empty when the run failed before evaluating",
            run=True,
        ),
    ]
    base_val_ppl: Annotated[float | None, Col("", "exp(base_val_loss)", "empty when base_val_loss is", run=True)]
    source_val_loss: Annotated[
        float | None,
        Col(
            "nats/token",
            "after fine-tuning, on the source set (held-out text of the base's own domain)",
            "empty without a source set, or when the run did not finish ok",
            run=True,
        ),
    ]
    source_val_ppl: Annotated[float | None, Col("", "exp(source_val_loss)", "empty when source_val_loss is", run=True)]
    base_source_val_ppl: Annotated[
        float | None, Col("", "the source set's perplexity before fine-tuning", "empty without a source set", run=True)
    ]
    forgetting: Annotated[
        float | None, Col("ratio", "source_val_ppl / base_source_val_ppl − 1", "empty when either is", run=True)
    ]
    tune_loss: Annotated[
        float | None,
        Col(
            "nats/token",
            "in an lr grid: the loss on the tune split the run's learning rate is chosen by",
            "empty without an lr grid, or when the run did not finish ok",
            run=True,
        ),
    ]
    train_tokens: Annotated[
        int | None,
        Col(
            "tokens", "tokens trained on (equal across a study by design)", "empty when the run failed early", run=True
        ),
    ]
    eval_max_tokens: Annotated[
        int, Col("tokens", "validation tokens predicted (each exactly once, whatever the context)")
    ]
    steps: Annotated[
        int | None, Col("optimizer steps", "optimizer steps taken", "empty when the run failed early", run=True)
    ]
    train_time_s: Annotated[
        float | None,
        Col(
            "s", "training wall time without evaluation and checkpointing", "empty when the run failed early", run=True
        ),
    ]
    tokens_per_s: Annotated[
        float | None, Col("tokens/s", "train_tokens / train_time_s", "empty when either is", run=True)
    ]
    peak_memory_bytes: Annotated[
        int | None,
        Col(
            "bytes",
            "the one comparable peak: peak_allocated_bytes on CUDA, peak_rss_bytes on CPU",
            "empty when both are",
        ),
    ]
    peak_allocated_bytes: Annotated[
        int | None,
        Col("bytes", "CUDA allocator peak during training (reset at the start of each run)", NO_CUDA, run=True),
    ]
    peak_reserved_bytes: Annotated[int | None, Col("bytes", "CUDA allocator's reserved-memory peak", NO_CUDA, run=True)]
    peak_active_bytes: Annotated[int | None, Col("bytes", "CUDA allocator's active-bytes peak", NO_CUDA, run=True)]
    peak_rss_bytes: Annotated[
        int | None,
        Col(
            "bytes",
            "CPU: the run process's peak resident memory from the start of training (interpreter, torch and data "
            "included)",
            "empty on CUDA",
            run=True,
        ),
    ]
    saved_for_backward_bytes: Annotated[
        int | None,
        Col(
            "bytes",
            "activation bytes one micro-batch keeps for backward (parameters excluded): the same on any device",
            "empty when the run failed early",
            run=True,
        ),
    ]
    trainable_params: Annotated[
        int | None, Col("parameters", "LoRA's trainable parameters", "empty when the run failed early", run=True)
    ]
    total_params: Annotated[
        int | None, Col("parameters", "the whole model's parameters", "empty when the run failed early", run=True)
    ]
    adapted_modules: Annotated[
        str | None,
        Col(
            "",
            "the modules LoRA wrapped, layer indices folded to * (what lora.target_modules resolved to on this base)",
            "empty when the run failed early",
            run=True,
        ),
    ]
    base_model: Annotated[
        str,
        Col(
            "",
            "`model.base`: builtin, or the checkpoint folder or .gguf file adapted (a name resolved to its path)",
            "empty in rows written before this column",
        ),
    ]
    lora_rank: Annotated[int, Col("", "`lora.rank`")]
    lora_alpha: Annotated[float, Col("", "LoRA's alpha after `lora.alpha_policy` is applied")]
    alpha_policy: Annotated[str, Col("", "`lora.alpha_policy`: fixed, double_rank or rslora")]
    target_modules: Annotated[str, Col("", "`lora.target_modules`, comma-separated")]
    context_length: Annotated[
        int, Col("tokens", "`model.max_position_embeddings`: the context trained and evaluated at")
    ]
    lr: Annotated[float, Col("", "`train.lr`: the peak learning rate of this run (in an lr grid, one of the grid's)")]
    config_hash: Annotated[str, Col("16 hex", "the run's identity: a hash of its full config", identity=True)]
    study_hash: Annotated[
        str,
        Col(
            "16 hex",
            "what the runs of one table share: the config without the swept key, the seed and an lr grid's lr",
            identity=True,
        ),
    ]
    corpus_fingerprint: Annotated[
        str | None, Col("16 hex", "content hash of the fine-tuning corpus", "empty when the run failed early", run=True)
    ]
    base_fingerprint: Annotated[
        str | None, Col("16 hex", "content hash of the base model folder", "empty when the run failed early", run=True)
    ]
    device: Annotated[str | None, Col("", "the GPU's name, or the CPU and its thread count", NO_PROCESS, run=True)]
    dtype: Annotated[str | None, Col("", "what it trained in: `float32` or `bfloat16 autocast`", NO_PROCESS, run=True)]
    world_size: Annotated[
        int | None, Col("processes", "data-parallel processes (torchrun), 1 without", NO_PROCESS, run=True)
    ]
    concurrency: Annotated[
        int | None,
        Col(
            "runs",
            "runs the sweep was training at once while this one trained (the peak, itself included): train times "
            "compare only at equal concurrency",
            "empty when unknown (rows written before this column, a copy whose original row is gone)",
        ),
    ]
    torch_version: Annotated[str | None, Col("", "`torch.__version__`", NO_PROCESS, run=True)]
    git_commit: Annotated[str, Col("", "HEAD of the checkout that ran it, or `unknown`")]
    run_dir: Annotated[str, Col("path", "the run's folder, relative to the results folder")]
    reused_from: Annotated[
        str | None,
        Col(
            "", "for a row copied from an identical config: where it came from", "empty for a run trained for this row"
        ),
    ]


def _columns() -> dict[str, tuple[tuple[type, ...], Col]]:
    """name -> (the JSON types its cell may hold, its Col), in column order."""
    out = {}
    for name, hint in typing.get_type_hints(Row, include_extras=True).items():
        kind, col = typing.get_args(hint)
        parts = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        out[name] = (tuple(type(None) if p is None else p for p in parts), col)
    return out


SCHEMA = _columns()
COLUMNS = tuple(SCHEMA)  # the results file's column order
RESULT_KEYS = tuple(k for k, (_, col) in SCHEMA.items() if col.run)  # what a fine-tuning run reports
ROW_IDENTITY = tuple(k for k, (_, col) in SCHEMA.items() if col.identity)  # what every row has


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}


def _fits(x: Any, allowed: tuple[type, ...]) -> bool:
    """JSON's view of a type: an int is a fine float, a bool is not a number; Any takes any JSON scalar."""
    if Any in allowed:
        return x is None or isinstance(x, (str, int, float, bool))
    if isinstance(x, bool):
        return bool in allowed
    if isinstance(x, int) and float in allowed:
        return True
    return isinstance(x, allowed)


def row_problems(row: Any) -> list[str]:
    """What keeps `row` from being a Row: identity columns it lacks, and columns whose cell has the wrong type
    ("lacks seed", 'val_ppl is "abc", not a number or null'). [] for a good row; columns it does not have besides
    the identity ones are fine (older versions wrote fewer), and so are columns this version does not know."""
    if not isinstance(row, dict):
        return [f"is {json.dumps(row)[:60]}, not a JSON object"]
    missing = [k for k in ROW_IDENTITY if k not in row]
    out = [f"lacks {', '.join(missing)}"] if missing else []
    for k, x in row.items():
        allowed = SCHEMA[k][0] if k in SCHEMA else None  # a column this version does not know is left alone
        if allowed is not None and not _fits(x, allowed):
            out.append(
                f"{k} is {json.dumps(x)[:60]}, not {' or '.join(_JSON_NAMES.get(t, 'a JSON scalar') for t in allowed)}"
            )
    return out


def read_result(run_dir: Path) -> dict | None:
    """What a run reported in its folder (RESULT_FILE), or None: not finished, or the file cannot be read."""
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
