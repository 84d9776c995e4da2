#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests, then GPTQ on a Llama-3-8B-shaped model with random
# weights (bench/gpu_llama8b.py), each within a time limit, so the whole check fits a short lease.
#     bash bench/gpu_check.sh [OUT_DIR]     (default bench/results)
set -u
out=${1:-bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv || exit 2
timeout 240 python -m pytest -q -m cuda tests 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
timeout 420 python bench/gpu_llama8b.py --out "$out/gpu_llama8b.json"
bench=$?
echo "cuda tests: exit $tests; gpu_llama8b: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
