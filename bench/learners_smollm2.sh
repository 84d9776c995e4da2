#!/usr/bin/env bash
# The learned family on SmolLM2-135M (docs/results.md, "Learners"): lwc, lsi, sde and CQE+ (sde with
# cross-layer learning), each before RTN and before GPTQ, at W3 and W2 g128 asymmetric (W2 also
# after QuaRot) on calibration seeds 0, 1, 2; then the band / look-ahead sweep on seed 0 before RTN
# at W3 (band 0 is lsi, band 1 sde, and band 1 with look-ahead 1 CQE+: the last line adds the rest
# of band 0, 1, 4 x look-ahead 0, 1, 2). Same windows and evaluation as bench/solvers_smollm2.py's
# table (8 x 512 calibration tokens, 16 x 512 evaluation tokens); 2 epochs of 8 steps per block.
# lwc:epochs=0 is the control: the learners' starting clipping (sigmoid(4) = 0.982 of the range)
# with no training, so that what training adds is told from what the initial clip does.
# none is the solver alone, run in the same file so that every row of a table comes from one machine
# (float32 GPTQ at W3 moved by 9 % between two machines of this kind).
# Each line resumes where it stopped and writes a file of its own, so lines can run side by side, one
# process per core (two lines on one file would overwrite each other's runs).
#     bash bench/learners_smollm2.sh
set -eu
common=(--data-dir ../shared/data --threads 1 --recipe-bits "" --solvers rtn,gptq --learner-epochs 2 --learner-batch 1)
python bench/solvers_smollm2.py "${common[@]}" --bits 3 --learners none,lwc:epochs=0,lwc,lsi,sde,cqe+ --seeds 0,1,2 \
    --out bench/results/learners_smollm2_w3.json
python bench/solvers_smollm2.py "${common[@]}" --bits 2 --transforms none,quarot --learners none,lwc:epochs=0,lwc,lsi,sde,cqe+ \
    --seeds 0,1,2 --out bench/results/learners_smollm2_w2.json
python bench/solvers_smollm2.py "${common[@]}" --bits 3 --solvers rtn --seeds 0 \
    --learners sde:band=4,sde:lookahead=2,sde:band=0:lookahead=1,sde:band=0:lookahead=2,sde:band=4:lookahead=1,sde:band=4:lookahead=2 \
    --out bench/results/learners_smollm2_sweep.json
