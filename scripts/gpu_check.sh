#!/usr/bin/env bash
# The one command a GPU session runs (budget: under 8 minutes on an H100/H200).
#
#   scripts/gpu_check.sh            # results under $OUT (device sessions) or benchmarks/results/<gpu>/
#
# Steps, each with its own time limit so one slow step cannot eat the others:
#   1. nvidia-smi and the versions (torch, triton, CUDA)               -> env.txt
#   2. vpeft selftest: bf16 numerics at real sizes, timings, registers -> selftest.json / selftest.txt
#   3. the GPU tests (kernel tests on CUDA, GPU memory tests)          -> pytest_gpu.txt
#   4. the kernel benchmarks (adapter, token-shift attention, ladder)  -> bench_kernels.txt + their JSON
#   5. the end-to-end B/16 cases that fit the remaining time           -> bench_e2e.txt
# A step's failure is recorded and the next step still runs; the exit status is the
# first failing step's. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY; nothing to do here (the CPU checks are 'make test')" >&2
    exit 2
fi
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
DEST="${OUT:-benchmarks/results/$gpu}"
mkdir -p "$DEST"
start=$(date +%s)
status=0
step() {  # step NAME LIMIT_S LOGFILE CMD...
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$(date +%s)
    echo "gpu_check: [$name] (limit ${limit}s) $*"
    timeout "$limit" "$@" >"$DEST/$log" 2>&1
    local rc=$?
    echo "gpu_check: [$name] rc=$rc in $(( $(date +%s) - t0 )) s; log $DEST/$log"
    tail -n 25 "$DEST/$log"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__)"; } >"$DEST/env.txt" 2>&1
cat "$DEST/env.txt" | head -20

step selftest 240 selftest.txt "$PY" -m vpeft_kernels.selftest --json "$DEST/selftest.json"
step gpu-tests 120 pytest_gpu.txt "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_adapter_kernels.py tests/test_token_shift_attention_kernel.py tests/test_ladder_extension.py \
    tests/test_gpu_memory.py -k "cuda or gpu or bf16 or auto_picks"
step bench-kernels 90 bench_kernels.txt "$PY" -m pytest -q -p no:cacheprovider \
    benchmarks/bench_adapter.py benchmarks/bench_token_shift_attention.py benchmarks/bench_ladder.py \
    --benchmark-only -k "vitb16 or b16 or B16"
left=$(( 460 - ($(date +%s) - start) ))
if [ $left -gt 30 ]; then
    step bench-e2e "$left" bench_e2e.txt "$PY" -m pytest -q -p no:cacheprovider \
        benchmarks/bench_e2e.py --benchmark-only -k "ViT-B-16 and T8"
else
    echo "gpu_check: [bench-e2e] skipped: ${left}s left of the 8-minute budget"
fi
# the benchmarks write under benchmarks/results/<device>/; keep a copy with the rest
bench_dir=$("$PY" -c "from benchmarks.common import results_dir; print(results_dir())" 2>/dev/null)
if [ -n "$bench_dir" ] && [ -d "$bench_dir" ] && [ "$(realpath "$bench_dir")" != "$(realpath "$DEST")" ]; then
    mkdir -p "$DEST/benchmarks" && cp -r "$bench_dir"/. "$DEST/benchmarks/"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s, status $status, results in $DEST"
exit $status
