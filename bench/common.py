"""What the benchmark scripts share: the solver configurations they compare, by label."""

SOLVERS: dict[str, tuple[str, dict]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptaq": ("gptaq", {}),
    "rescomp(gptq)": ("rescomp", {"base": "gptq"}),
    "rescomp(gptaq)": ("rescomp", {"base": "gptaq"}),
}
