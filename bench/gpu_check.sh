#!/usr/bin/env bash
# The GPU check: what only a CUDA GPU can show, in one run of a few minutes on
# one GPU (strict mode raising nothing for the shipped models and configs,
# bitwise repeatability on the GPU, throughput with and without determinism,
# and optionally the fast config on real CIFAR-10). bench/gpu_check.py says
# what each stage does.
#
#   bash bench/gpu_check.sh OUT_DIR [CIFAR_IMAGEFOLDER_DIR]
#   bash bench/gpu_check.sh --cpu-smoke OUT_DIR [DIR]   # every stage for 1-2 steps on the CPU
#   GPU_CHECK_STAGES=fba bash bench/gpu_check.sh OUT_DIR DIR   # some stages, in this order
#   GPU_CHECK_BUDGET_S=300 bash bench/gpu_check.sh OUT_DIR DIR  # no stage starts after 300 s (default 460)
#   AIRBENCH94=PATH GPU_CHECK_STAGES=fi bash bench/gpu_check.sh OUT_DIR DIR   # stage i: airbench94 beside stage f
#
# Run from anywhere; it uses the repository it lives in. It installs nothing
# and needs no network: it runs the python3 on PATH (or $PYTHON) with what is
# installed there, and a stage whose modules are missing is skipped with a
# line saying so. The full log goes to OUT_DIR/gpu_check.log, the figures to
# OUT_DIR/gpu_check.json, train.py's runs to OUT_DIR/runs/. Exit status: 0 if
# no check failed, 1 if one did, 2 on a usage error or with no usable GPU.
set -uo pipefail

smoke=()
if [[ ${1:-} == --cpu-smoke ]]; then
    smoke=(--cpu-smoke)
    shift
fi
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: bash bench/gpu_check.sh [--cpu-smoke] OUT_DIR [CIFAR_IMAGEFOLDER_DIR]" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
budget=()
if [[ -n ${GPU_CHECK_BUDGET_S:-} ]]; then
    budget=(--budget-s "$GPU_CHECK_BUDGET_S")
fi
airbench=()
if [[ -n ${AIRBENCH94:-} ]]; then
    airbench_dir=$(cd "$(dirname "$AIRBENCH94")" && pwd) || exit 2
    airbench=(--airbench94 "$airbench_dir/$(basename "$AIRBENCH94")")
fi
data=()
if [[ $# -eq 2 ]]; then
    data_dir=$(cd "$2" && pwd) || exit 2
    data=("$data_dir")
fi
python=${PYTHON:-python3}
if [[ $python == */* ]]; then  # a path relative to where we were started: make it absolute before the cd
    python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")
fi
cd "$(dirname "$0")/.." || exit 2

if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; set PYTHON to an interpreter that can" >&2
    exit 2
fi

{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $("$python" --version 2>&1)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$python" bench/gpu_check.py "${smoke[@]}" "${budget[@]}" "${airbench[@]}" --stages "${GPU_CHECK_STAGES:-fcbade}" "$out" "${data[@]}"
} 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
echo "log: $out/gpu_check.log  figures: $out/gpu_check.json"
exit "$status"
