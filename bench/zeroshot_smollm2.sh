#!/usr/bin/env bash
# Zero-shot accuracy (lm-eval, six tasks, first 200 documents each) of SmolLM2-135M in full precision,
# after GPTQ W4 g128 and after ResComp(GPTAQ) W3 g128 (128 x 512 calibration tokens each), and the
# exported models' size on disk beside an fp16 checkpoint. One core per command; about 2 hours in all
# on this 2-core CPU. Work files go to $WORK (default /tmp/zs).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/zs}
TASKS=piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai
mkdir -p "$WORK"
export COMPQUANT_NO_PROGRESS=1
common=(--group-size 128 --nsamples 128 --seqlen 512 --data-dir ../shared/data --dtype float16 --threads 1)
compquant quantize smollm2-135m --solver gptq --bits 4 "${common[@]}" --output "$WORK/gptq-w4g128"
compquant quantize smollm2-135m --solver rescomp --bits 3 "${common[@]}" --output "$WORK/rescomp-w3g128"
# the same ResComp run, packed (auto fell back to fake: see the README), for its size on disk
compquant quantize smollm2-135m --solver rescomp --bits 3 "${common[@]}" --nsamples 8 --format gptq-v2 \
    --output "$WORK/rescomp-w3g128-gptqv2"
for model in smollm2-135m "$WORK/gptq-w4g128" "$WORK/rescomp-w3g128"; do
    compquant eval "$model" --tasks "$TASKS" --limit 200 --data-dir ../shared/data --threads 1 \
        --json "$WORK/$(basename "$model").zeroshot.json"
done
python -c "import torch, compquant; m = compquant.load_model('smollm2-135m'); m.model.half().save_pretrained('$WORK/fp16')"
du -b "$WORK"/fp16/model.safetensors "$WORK"/*/model.safetensors
