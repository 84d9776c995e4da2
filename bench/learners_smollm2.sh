#!/usr/bin/env bash
# The learned family on SmolLM2-135M (docs/results.md, "Learners on SmolLM2"): lwc, lsi, sde and
# CQE+ (sde with cross-layer learning), each before RTN and before GPTQ, at W3 and W2 g128
# asymmetric (W2 also after QuaRot) on calibration seeds 0, 1, 2, and LWC and CQE+ at ten times the
# clipping rate at W2; then the band / look-ahead sweep on seed 0 before RTN at W3 (band 0 is lsi,
# band 1 sde, band 1 with look-ahead 1 CQE+; the sweep adds the rest of band 0, 1, 4 x look-ahead
# 0, 1, 2, at OmniQuant's rate and at ten times it), band 4 and the ten-times rate again on seed 1;
# then auto-round on the same windows (bench/vs_autoround.py, in its own venv); last, the Markdown
# tables of the docs (bench/learners_table.py). Same windows and evaluation as
# bench/solvers_smollm2.py's table (8 x 512 calibration tokens, 16 x 512 evaluation tokens); 2 epochs
# of 8 steps per block.
# lwc:epochs=0 is the control: the learners' starting clipping (sigmoid(4) = 0.982 of the range)
# with no training, so that what training adds is told from what the initial clip does.
# none is the solver alone, run in the same file so that every row of a table comes from one machine
# (float32 GPTQ at W3 moved by 9 % between two machines of this kind).
# Each line resumes where it stopped. The W3, W2, W2-after-QuaRot, sweep and auto-round files are
# separate, so lines on different files can run side by side, one process per core; two processes on
# one file would overwrite each other's runs.
#     bash bench/learners_smollm2.sh
set -eu
common=(--data-dir ../shared/data --threads 1 --recipe-bits "" --solvers rtn,gptq --learner-epochs 2 --learner-batch 1)
learners=none,lwc:epochs=0,lwc,lsi,sde,cqe+
python bench/solvers_smollm2.py "${common[@]}" --bits 3 --learners $learners --seeds 0,1,2 \
    --out bench/results/learners_smollm2_w3.json
for transform in none quarot; do
    out=bench/results/learners_smollm2_w2$([ $transform = none ] || echo _$transform).json
    python bench/solvers_smollm2.py "${common[@]}" --bits 2 --transforms $transform --seeds 0 \
        --learners $learners,lwc:lr=0.1,cqe+:lr=0.1 --out $out
    python bench/solvers_smollm2.py "${common[@]}" --bits 2 --transforms $transform --seeds 1,2 \
        --learners none,lwc:lr=0.1,cqe+:lr=0.1 --out $out
    python bench/solvers_smollm2.py "${common[@]}" --bits 2 --transforms $transform --seeds 1,2 --learners $learners --out $out
done
sweep=sde:band=4,sde:lookahead=2,sde:band=0:lookahead=1,sde:band=0:lookahead=2,sde:band=4:lookahead=1,sde:band=4:lookahead=2
fast=lwc:lr=0.1,lsi:lr=0.1,sde:lr=0.1,cqe+:lr=0.1
sweep_fast=sde:band=0:lookahead=1:lr=0.1,sde:band=0:lookahead=2:lr=0.1,sde:lookahead=2:lr=0.1,sde:band=4:lr=0.1,sde:band=4:lookahead=1:lr=0.1,sde:band=4:lookahead=2:lr=0.1
python bench/solvers_smollm2.py "${common[@]}" --bits 3 --solvers rtn --seeds 0 \
    --learners $sweep,$fast,$sweep_fast --out bench/results/learners_smollm2_sweep.json
python bench/solvers_smollm2.py "${common[@]}" --bits 3 --solvers rtn --seeds 1 --learners sde:band=4,sde:band=4:lookahead=1,lwc:lr=0.1,cqe+:lr=0.1 \
    --out bench/results/learners_smollm2_sweep.json
python bench/vs_autoround.py --data-dir ../shared/data --bits 3,2 --seeds 0,1,2 --out bench/results/autoround_smollm2.json
python bench/learners_table.py
