#!/usr/bin/env bash
# GPU suite for a machine with an NVIDIA GPU and no network. Installs nothing.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [--cpu-dry-run]
#
# Steps (each logs to OUTDIR/<step>.log with its command, exit status and wall time; OUTDIR/summary.txt lists
# them all): env (python, torch, CUDA check), build (C++ extension in place), nvidia_smi, info (pydiffmed info),
# gpu_tests (pytest -m gpu, junit xml in OUTDIR/gpu_tests.xml, skip reasons in the log), one step per GPU
# benchmark at --quick sizes with its own time limit (about 9 minutes in all), bench_distributed (the N-GPU form:
# 1 GPU against all visible GPUs, NCCL; skipped, saying why, with fewer than 2), bench_decode_maisi (issue 14's
# 512³ MAISI-architecture decode), results_md (regenerated
# RESULTS.md and README.md's benchmarks block). The benchmarks' *_cuda.json and *_cuda.png files written during
# this run, RESULTS.md and README.md are copied to OUTDIR/results/. A failing step does not stop the later ones; the exit status is 1 if any step failed.
#
# CPU mode (--cpu-dry-run, or no CUDA device visible to torch): runs the steps up to the first GPU call, then,
# instead of GPU work, collects the GPU tests and checks each benchmark's command line (--help). Exit status:
# 0 if those steps passed with --cpu-dry-run; 3 if the mode was forced because no GPU was visible (a GPU suite
# that ran nothing on a GPU has not succeeded).
#
# Python: the repository's .venv if present, else the python3 on PATH. CuPy is used if installed, never
# installed here; without it the cuda-backend tests are skipped and say why in gpu_tests.log.
# bench_solvers is left out: it runs on the CPU only (exact Gaussian-mixture model), so it has no GPU rows.
set -u

usage() { echo "usage: bash benchmarks/gpu_suite.sh OUTDIR [--cpu-dry-run]" >&2; exit 2; }

OUTDIR=""
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY_RUN=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $arg" >&2; usage ;;
        *) [ -z "$OUTDIR" ] || usage; OUTDIR="$arg" ;;
    esac
done
[ -n "$OUTDIR" ] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$ROOT" || exit 2

if [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1; then
    PY="$(command -v python3)"
else
    echo "no python: neither $ROOT/.venv/bin/python nor python3 on PATH" >&2
    exit 2
fi

# Per-benchmark time limits in seconds (sum 650 s with the three kernel benchmarks of today: the GPU benchmarks
# must finish within about 11 minutes). The kernel benchmarks are bench_<op> for every op in pydiffmed's backend
# registry that has a script (benchmarks/common.py op_benchmarks), OP_BENCH_LIMIT seconds each.
# bench_end_to_end and bench_scaling rewrite their results after every model / point, so one stopped by its limit
# still leaves the rows measured so far (marked PARTIAL).
OP_BENCH_LIMIT=60
OP_BENCHMARKS_CMD='import sys; sys.path.insert(0, "benchmarks"); import common; print(" ".join(common.op_benchmarks()))'
BENCHMARKS=(bench_unet:110 bench_sampling:120 bench_end_to_end:50 bench_scaling:30 bench_determinism:30
            bench_decode:40 bench_inferer:30 bench_inverse:60)
TESTS_TIMEOUT=900
# bench_distributed's N-GPU form (after the loop above; not counted in its 9 minutes: on a machine with one GPU it
# skips at once, on W >= 2 GPUs it runs 1 GPU against W with both modes in one launch per configuration).
NGPU_LIMIT=240
NGPU_BENCH=(benchmarks/bench_distributed.py --quick --device cuda --one-launch)
# Issue 14's GPU row (after the N-GPU step, also not counted in the 9 minutes): MAISI's released autoencoder
# architecture decoding to 512³, MAISI's num_splits against pydiffmed's slabs (bench_decode_maisi_cuda.json).
MAISI_DECODE_LIMIT=300
MAISI_DECODE_BENCH=(benchmarks/bench_decode.py --architecture maisi --repeats 1)

SUMMARY="$OUTDIR/summary.txt"
START_MARK="$OUTDIR/.suite_started"
: > "$SUMMARY"
touch "$START_MARK"
FAILED=()

# run_step NAME TIMEOUT_S COMMAND...: run COMMAND under `timeout`, output to OUTDIR/NAME.log, record the result.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local log="$OUTDIR/$name.log" start end wall rc status
    {
        echo "# step: $name"
        echo "# command: $*"
        echo "# time limit: ${limit} s"
        echo "# started: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    } > "$log"
    echo "[$name] $* (limit ${limit} s)"
    start=$(date +%s.%N)
    timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status="ok" ;;
        124|137) status="timed out" ;;
        *) status="failed" ;;
    esac
    echo "# exit: $rc ($status), wall time: ${wall} s" >> "$log"
    printf '%-20s %-10s exit %-4s %8s s\n' "$name" "$status" "$rc" "$wall" >> "$SUMMARY"
    echo "[$name] $status (exit $rc) in ${wall} s -> $log"
    [ $rc -eq 0 ] || FAILED+=("$name")
    return $rc
}

# Step env: which python and torch, and whether torch sees a CUDA device.
ENV_CHECK="$OUTDIR/env_check.py"
cat > "$ENV_CHECK" <<'EOF_PY'
import platform, sys, torch
print("python", sys.executable, platform.python_version())
print("torch", torch.__version__, "built for CUDA", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(" ", i, torch.cuda.get_device_name(i))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
try:
    import cupy
    print("cupy", cupy.__version__)
except Exception as exc:
    print("cupy: not importable (cuda backend tests will skip):", exc)
EOF_PY
CUDA_CHECK='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'

run_step env 120 "$PY" "$ENV_CHECK"
# The kernel benchmarks, from the registry (a failure to list them is a failed step; the others still run).
if OP_BENCHMARKS=$("$PY" -c "$OP_BENCHMARKS_CMD" 2> "$OUTDIR/op_benchmarks.log"); then
    echo "kernel benchmarks from the op registry: $OP_BENCHMARKS" >> "$OUTDIR/op_benchmarks.log"
    OP_ENTRIES=()
    for bench in $OP_BENCHMARKS; do
        OP_ENTRIES+=("$bench:$OP_BENCH_LIMIT")
    done
    BENCHMARKS=("${OP_ENTRIES[@]}" "${BENCHMARKS[@]}")
else
    printf '%-20s %-10s\n' op_benchmarks "failed" >> "$SUMMARY"
    FAILED+=(op_benchmarks)
fi
NO_GPU=0
if [ $DRY_RUN -eq 0 ] && ! "$PY" -c "$CUDA_CHECK" >> "$OUTDIR/env.log" 2>&1; then
    NO_GPU=1
    DRY_RUN=1
    echo "torch sees no CUDA device: switching to CPU mode (runs up to the first GPU call; exit status 3)" \
        | tee -a "$OUTDIR/env.log"
fi
if [ $DRY_RUN -eq 1 ]; then
    echo "CPU mode: no GPU tests or GPU benchmarks will run" | tee -a "$OUTDIR/env.log"
    export TRITON_INTERPRET=1
else
    # Real GPU run: Triton must compile for the device, not run under its interpreter.
    unset TRITON_INTERPRET
fi

# Concurrent builds in the same checkout serialize on this lock where flock exists (harmless elsewhere).
if command -v flock >/dev/null 2>&1; then
    run_step build 900 flock /tmp/pydiffmed-build.lock "$PY" setup.py -q build_ext --inplace
else
    run_step build 900 "$PY" setup.py -q build_ext --inplace
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    run_step nvidia_smi 60 nvidia-smi
elif [ $DRY_RUN -eq 1 ]; then
    echo "nvidia-smi not found (CPU mode: not counted as a failure)" > "$OUTDIR/nvidia_smi.log"
    printf '%-20s %-10s\n' nvidia_smi "absent" >> "$SUMMARY"
else
    echo "nvidia-smi not found" > "$OUTDIR/nvidia_smi.log"
    printf '%-20s %-10s\n' nvidia_smi "absent" >> "$SUMMARY"
    FAILED+=(nvidia_smi)
fi

run_step info 120 "$PY" -m pydiffmed.cli info

if [ $DRY_RUN -eq 1 ]; then
    # Everything from here on would touch the GPU: check the commands without running them.
    run_step gpu_tests_collect 300 "$PY" -m pytest -m gpu tests --collect-only -q
    for entry in "${BENCHMARKS[@]}"; do
        bench="${entry%%:*}"
        run_step "${bench}_help" 120 "$PY" "benchmarks/$bench.py" --help
        echo "  would run: timeout ${entry##*:} $PY benchmarks/$bench.py --quick" >> "$SUMMARY"
    done
    run_step bench_distributed_help 120 "$PY" benchmarks/bench_distributed.py --help
    echo "  would run: timeout $NGPU_LIMIT $PY ${NGPU_BENCH[*]}" >> "$SUMMARY"
    echo "  would run: timeout $MAISI_DECODE_LIMIT $PY ${MAISI_DECODE_BENCH[*]}" >> "$SUMMARY"
else
    run_step gpu_tests "$TESTS_TIMEOUT" "$PY" -m pytest -m gpu tests -q -rs \
        --junitxml="$OUTDIR/gpu_tests.xml"
    for entry in "${BENCHMARKS[@]}"; do
        run_step "${entry%%:*}" "${entry##*:}" "$PY" "benchmarks/${entry%%:*}.py" --quick
    done
    # N-GPU form: one process per visible GPU (torchrun, NCCL) against one GPU; with fewer than 2 GPUs it prints
    # why it skipped and exits 0 in seconds.
    run_step bench_distributed "$NGPU_LIMIT" "$PY" "${NGPU_BENCH[@]}"
    run_step bench_decode_maisi "$MAISI_DECODE_LIMIT" "$PY" "${MAISI_DECODE_BENCH[@]}"
    run_step results_md 120 "$PY" benchmarks/results_md.py
    mkdir -p "$OUTDIR/results"
    # Only results written by this run: older *_cuda.json files may come from another commit or machine.
    copied=0
    for f in benchmarks/results/*_cuda.json benchmarks/results/*_cuda.png; do
        [ -e "$f" ] || continue
        if [ "$f" -nt "$START_MARK" ]; then
            cp "$f" "$OUTDIR/results/" && copied=$((copied + 1))
        else
            echo "not copied (older than this run): $f" >> "$SUMMARY"
        fi
    done
    cp benchmarks/RESULTS.md "$OUTDIR/results/RESULTS.md" || FAILED+=(copy_results_md)
    cp README.md "$OUTDIR/results/README.md" || FAILED+=(copy_readme)  # its regenerated benchmarks block
    echo "copied $copied result file(s) to $OUTDIR/results" >> "$SUMMARY"
fi

echo
echo "== summary ($OUTDIR/summary.txt)"
cat "$SUMMARY"
rm -f "$START_MARK"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED steps: ${FAILED[*]}" | tee -a "$SUMMARY"
    exit 1
fi
if [ $NO_GPU -eq 1 ]; then
    echo "no CUDA device was visible: nothing ran on a GPU" | tee -a "$SUMMARY"
    exit 3
fi
if [ $DRY_RUN -eq 1 ]; then
    echo "CPU dry run passed: every step up to the first GPU call works" | tee -a "$SUMMARY"
else
    echo "all steps passed" | tee -a "$SUMMARY"
fi
exit 0
