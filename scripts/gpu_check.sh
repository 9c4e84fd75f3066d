#!/usr/bin/env bash
# Issue 14 in one run on a GPU machine (the device tool's H200): everything to check and measure, time-boxed so
# that it ends well inside 10 minutes. Results land in ${OUT:-gpu-results}/.
#
#   bash scripts/gpu_check.sh            # on the device: run(command="bash scripts/gpu_check.sh", timeout_s=590)
#
# The device image has torch, onnxruntime and most of our dependencies; what it lacks travels as wheels (.whl,
# see the device README). Steps:
#   1. versions and the GPU;
#   2. the gpu-marked tests (CUDA vs CPU parity for every family, the torch backend at fp32/bf16/fp16, ORT CUDA);
#   3. scripts/gpu_bench.py: ms per batch and images/s per model and level at 512x512 and 1024x2048, batch 1/8/32,
#      fp32/tf32/bf16/fp16, and the masks' pixel agreement of bf16/fp16 with fp32;
#   4. the service on the GPU at saturation (segformer-b0, then the ADE20K pool) and the load test's short run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi -L; python3 -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'ort', onnxruntime.__version__, onnxruntime.get_available_providers())"
} 2>&1 | tee "$out/versions.txt"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/service/workers/test_cuda_backend.py \
  tests/models/test_segformer_gpu.py 2>&1 | tee "$out/pytest_gpu.txt"
timeout 240 python3 scripts/gpu_bench.py --out "$out" \
  --models edaformer-t,edaformer-b,segformer-b0,segformer-b2,segformer-b5,seaformer-t,seaformer-l,lrformer-t,dovit-s,dovit-b \
  --case-budget-s 1.5 2>&1 | tail -n 400 > "$out/gpu_bench.log"
timeout 150 python3 -m loadtest run --device cuda --config ade20k-pool --loads 0.5,0.8,1.0,1.5 --duration 10 \
  --out "$out/loadtest" 2>&1 | tail -n 60 | tee "$out/loadtest.log"
ls -la "$out"
