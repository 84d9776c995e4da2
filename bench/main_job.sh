#!/usr/bin/env bash
# The README's main job (command 1) with its JSON kept: fp vs RTN vs GPTQ, W3 g128, on SmolLM2-135M.
# Run it on an otherwise idle machine: the wall times are the point.
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${COMPQUANT_DATA_DIR:-../shared/data}
mkdir -p bench/results
compquant compare --data-dir "$data_dir" --threads 2 --json bench/results/compare_smollm2_w3g128.json "$@"
