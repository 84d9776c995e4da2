"""What the benchmark scripts share: the solver configurations they compare, by label, and
SmolLM2-135M cut to its first blocks with calibration windows."""
from __future__ import annotations

from typing import Any

SOLVERS: dict[str, tuple[str, dict]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptaq": ("gptaq", {}),
    "rescomp(gptq)": ("rescomp", {"base": "gptq"}),
    "rescomp(gptaq)": ("rescomp", {"base": "gptaq"}),
}


def smollm2_blocks(blocks: int, nsamples: int, seqlen: int, data_dir: str) -> tuple[Any, Any]:
    """SmolLM2-135M with only its first ``blocks`` blocks, and ``nsamples`` × ``seqlen`` WikiText-2
    validation windows (seed 0) to calibrate it on."""
    import compquant
    from compquant.evaluation.datasets import calibration_windows

    loaded = compquant.load_model("smollm2-135m")
    model = loaded.model.eval()
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=nsamples, seqlen=seqlen, seed=0,
                                  data_dir=data_dir)
    return model, windows
