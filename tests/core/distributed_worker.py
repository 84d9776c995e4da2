"""One rank of the distributed tests (tests/core/test_distributed.py), run by torchrun:
``distributed_worker.py MODEL_DIR CALIBRATION CASES OUTPUT`` quantizes the model saved in MODEL_DIR
once per case (a JSON list of config mappings, see `codes_of_every_case`) on the token ids saved in
CALIBRATION, and rank 0 saves every case's integer codes to OUTPUT. The test calls
`codes_of_every_case` in its own process for the single-process reference."""
from __future__ import annotations

import json
import sys
from typing import Any

import torch


def codes_of_every_case(model_dir: str, calibration: torch.Tensor,
                        cases: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """For each case, the integer codes of every quantized linear, by name. A case's ``resume_dir``
    (``{ranks}`` in it becomes the number of ranks) keeps the run's checkpoint there."""
    from transformers import AutoModelForCausalLM

    import compquant

    from compquant.core.distributed import Ranks

    results = []
    for case in cases:
        settings = dict(case)
        resume_dir = settings.pop("resume_dir", "").format(ranks=Ranks.current().world) or None
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        report = compquant.quantize(model, compquant.QuantConfig(**settings), calibration=calibration,
                                    resume_dir=resume_dir)
        results.append({name: record.codes for name, record in report.records.items()})
    return results


def main(model_dir: str, calibration: str, cases: str, output: str) -> None:
    from compquant.core.distributed import ranks_from_environment

    with ranks_from_environment(torch.device("cpu")) as ranks:
        results = codes_of_every_case(model_dir, torch.load(calibration), json.loads(cases))
    if ranks.main:
        torch.save(results, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
