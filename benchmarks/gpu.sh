#!/usr/bin/env bash
# One command on a GPU machine: bf16-vs-fp32 and CUDA-vs-CPU time, and peak CUDA memory, of one
# DP-SGD local round per neural model and phase -> benchmarks/gpu_results.json and a markdown table.
# Without CUDA it times the CPU only (the table says "no CUDA"). Arguments go to the Python module:
#   benchmarks/gpu.sh            # demo-sized models, one demo hospital's patients (GPU: < 3 min)
#   benchmarks/gpu.sh --quick    # tiny models, a few batches (a check that everything runs)
# PYTHON=/path/to/python picks the interpreter; else the repo's .venv, else python3 on PATH.
set -euo pipefail

cd "$(dirname "$0")/.."  # `-m benchmarks.gpu_ratios` imports the project from the repo root
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python="$(command -v python3 || command -v python)"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "nvidia-smi not found: no NVIDIA driver on this machine"
fi
"$python" -c 'import torch; print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")'
exec "$python" -m benchmarks.gpu_ratios "$@"
