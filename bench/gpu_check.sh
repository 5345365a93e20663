#!/usr/bin/env bash
# Every GPU figure in one command: the CUDA tests, bench.layer, bench.train, experiments.run --quick,
# then the targets of bench/NOTES.md against what was measured. Budget: 25 minutes on one H100.
#
#   bash bench/gpu_check.sh                # every step, in this order: tests layer train quick targets
#   bash bench/gpu_check.sh layer train    # only the named steps (e.g. one per call where a call is time-limited)
#
# Without a CUDA device it says so in one line and exits 0, doing nothing. A failing step is reported and the next
# one still runs; the exit code is 0 only if every step passed (a missed target is a finding, not a failed step).
# Every file goes to bench/results/ with the GPU's name in it (<gpu> below, e.g. nvidia-h100-80gb-hbm3):
#   tests_cuda_<gpu>.xml (junit) and .log     layer_bfloat16_cuda_<gpu>.json     train_cuda_<gpu>.json
#   quick_cuda_<gpu>/ (report.md, results.jsonl/.csv, plots/)     targets_cuda_<gpu>.md     gpu_check_cuda_<gpu>.log
# PYTHON=/path/to/python picks the interpreter (default: python, else python3); GPU_CHECK_RESULTS another folder.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
ALL=(tests layer train quick targets)

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${ALL[@]}")
for s in "${steps[@]}"; do
    case " ${ALL[*]} " in
        *" $s "*) ;;
        *) echo "gpu_check: unknown step '$s'; the steps are: ${ALL[*]}" >&2; exit 2 ;;
    esac
done

if ! gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'); then
    echo "gpu_check: '$PY' cannot import torch (error above); install requirements.txt first" >&2
    exit 2
fi
if [ -z "$gpu" ]; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False), nothing to do."
    exit 0
fi

slug=$(printf '%s' "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
tag="cuda_$slug"
R=${GPU_CHECK_RESULTS:-bench/results}
mkdir -p "$R"
exec > >(tee -a "$R/gpu_check_$tag.log") 2>&1

step_tests() {  # every CUDA case of the suite: the device fixture's CUDA cases and @pytest.mark.cuda tests
    "$PY" -m pytest -m cuda -p no:cacheprovider -rs --junitxml="$R/tests_$tag.xml" 2>&1 | tee "$R/tests_$tag.log"
}

step_layer() {  # the full grid on CUDA: N in {2048, 8192} x d in {768, 2048, 4096} x r in {8, 16, 64}
    "$PY" -m bench.layer --device cuda --dtype bfloat16 --out "$R/layer_bfloat16_$tag.json"
}

step_train() {  # opt-125m at seq 512 and 2048, bf16: LoRA q,v, LoRA all six, full fine-tuning, with MFU
    "$PY" -m bench.train --device cuda --precision bf16 --shape gpu-512 --shape gpu-2048 --out "$R/train_$tag.json"
}

step_quick() {  # the whole lab path on CUDA, in a private cache (base pretraining included), report kept
    local tmp rc
    tmp=$(mktemp -d)
    SLM_LORA_CACHE="$tmp/cache" "$PY" -m experiments.run --quick --no-progress --set train.device=cuda \
        --out "$tmp/quick"
    rc=$?
    rm -rf "$R/quick_$tag" && mkdir -p "$R/quick_$tag"
    for f in report.md results.jsonl results.csv plots; do
        [ -e "$tmp/quick/$f" ] && cp -r "$tmp/quick/$f" "$R/quick_$tag/"
    done
    rm -rf "$tmp"
    return $rc
}

step_targets() {  # our performance targets (bench/targets.py) against this GPU's layer and train files
    "$PY" -m bench.targets --layer "$R/layer_bfloat16_$tag.json" --train "$R/train_$tag.json" \
        | tee "$R/targets_$tag.md"
}

echo "gpu_check: $gpu; steps: ${steps[*]}; $(date -u +%FT%TZ); git $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
"$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}")'

failed=()
summary=()
for s in "${steps[@]}"; do
    echo
    echo "=== gpu_check step: $s"
    start=$SECONDS
    "step_$s"
    rc=$?
    took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        summary+=("$s: passed (${took} s)")
    else
        summary+=("$s: FAILED, exit $rc (${took} s)")
        failed+=("$s")
    fi
done

echo
echo "=== gpu_check summary ($gpu)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: ${#failed[@]} step(s) failed: ${failed[*]}"
    exit 1
fi
echo "gpu_check: every step passed; results in $R/*$tag*"
