"""A third-party compquant plugin: a solver, a learner, a checkpoint format and a dataset,
registered through the `compquant` entry-point group with no change to compquant."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import compquant
from pydantic import Field


class PerRowNearest(compquant.Solver):
    """Per-row round-to-nearest that ignores the group size."""

    def statistics(self, options):
        return frozenset()

    def solve(self, weight, stats, grid, options):
        params = grid.find_params(weight)
        codes = grid.quantize(weight, params)
        return compquant.LayerResult(
            weight=grid.dequantize(codes, params),
            codes=codes.to(torch.int16),
            scale=params.scale.unsqueeze(1),
            zero=params.zero.unsqueeze(1),
            g_idx=torch.zeros(weight.shape[1], dtype=torch.long),
        )


class RowScaleOptions(compquant.LearnerOptions):
    lr: float = Field(1e-3, gt=0, description="learning rate of the row scales")


class RowScale(compquant.LinearParametrization):
    """The weight with one trainable factor per output row (starting at 1); grids from its min/max."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer("base", weight.detach().clone())
        self.scale = torch.nn.Parameter(torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device))

    def weight(self):
        return self.scale * self.base


class RowScaleLearner(compquant.GradientLearner):
    """Learns a scale per output row of every linear, so that the quantized block matches the
    full-precision one."""

    Options = RowScaleOptions

    def parametrize(self, linear, grid, options):
        return RowScale(linear.weight)


class ExampleCodes(compquant.Exporter):
    """An in-house format: unsigned codes, scales, zeros and the group index of every linear, and
    a config section naming the format; it reads its own checkpoints back."""

    name = "example-codes"
    description = "codes, scales, zeros and g_idx per linear (the example plugin's in-house format)"
    METHOD = "compquant-example-codes"

    def unsupported(self, job):
        return None if job.is_transformers_model else "only transformers models"

    def convert_linear(self, record, dtype):
        return {"codes": record.codes, "scales": record.scale.to(dtype), "zeros": record.zero, "g_idx": record.g_idx}

    def annotate(self, folder, records):
        config_file = Path(folder) / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"] = {"quant_method": self.METHOD, "bits": next(iter(records.values())).bits}
        config_file.write_text(json.dumps(config))

    def reads(self, config):
        return config.get("quantization_config", {}).get("quant_method") == self.METHOD

    def load(self, folder, config, dtype):
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        state = load_file(str(Path(folder) / "model.safetensors"))
        for name in [key.removesuffix(".codes") for key in state if key.endswith(".codes")]:
            index = state.pop(f"{name}.g_idx").long()
            scales, zeros, codes = state.pop(f"{name}.scales"), state.pop(f"{name}.zeros"), state.pop(f"{name}.codes")
            state[f"{name}.weight"] = scales[:, index] * (codes.to(scales.dtype) - zeros[:, index].to(scales.dtype))
        model_config = AutoConfig.from_pretrained(folder)
        del model_config.quantization_config
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        return model.eval()


class ExampleCorpus(compquant.TextDataset):
    """An in-house corpus: <data folder>/example-corpus/<purpose>.txt."""

    def _path(self, purpose, data_dir):
        return None if data_dir is None else Path(data_dir) / "example-corpus" / f"{purpose}.txt"

    def problem(self, purpose, data_dir):
        path = self._path(purpose, data_dir)
        if path is None or not path.is_file():
            return f"{path or 'example-corpus/' + purpose + '.txt'} does not exist; pass --data-dir with the corpus in it"
        return None

    def text(self, purpose, data_dir):
        return self._path(purpose, data_dir).read_text()


@compquant.hookimpl
def compquant_register_solvers(register):
    register("per-row-nearest", PerRowNearest())


@compquant.hookimpl
def compquant_register_learners(register):
    register("row-scale", RowScaleLearner())


@compquant.hookimpl
def compquant_register_exporters(register):
    register(ExampleCodes.name, ExampleCodes())


@compquant.hookimpl
def compquant_register_datasets(register):
    register("example-corpus", ExampleCorpus())
