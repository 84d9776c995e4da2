"""GPTQModel, the consumer the gptq and gptq-v2 formats are written for, reads compquant's exports
back to the same logits as compquant's own reader. GPTQModel is not a dependency (CI skips this
file); `bench/gptqmodel_reads_exports.py` runs the same check on SmolLM2, and docs/results.md has
its result. Run here with GPTQModel's environment (docs/results.md says how it is built):

    PYTHONPATH=<parent of compquant> /work/venv-gptqmodel/bin/python -m pytest tests/plugins/exporters/test_gptqmodel.py
"""
import json
import shutil

import pytest
import torch

gptqmodel = pytest.importorskip("gptqmodel", reason="GPTQModel is not installed (an optional consumer, not a dependency)")

import compquant  # noqa: E402
from compquant import QuantConfig  # noqa: E402


def gptqmodel_logits(folder, ids):
    """GPTQModel's own load on the CPU with its pure-torch kernel, which holds float16 or bfloat16
    scales; the model is then cast to float32, so the comparison is at float32 precision."""
    loaded = gptqmodel.GPTQModel.load(str(folder), backend=gptqmodel.BACKEND.TORCH, device="cpu", dtype=torch.float16)
    model = loaded.model.float().eval()
    with torch.no_grad():
        return model(ids).logits


def export(make_llama, tiny_tokenizer, token_batches, folder, format, bits, sym, act_order):
    model = make_llama(seed=5)
    config = QuantConfig(solver="gptq", grid={"bits": bits, "group_size": 32, "sym": sym},
                         solver_options={"act_order": act_order})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    return compquant.save_quantized(model, tiny_tokenizer, folder, config=config, report=report, format=format,
                                    dtype=torch.float16)


@pytest.mark.parametrize("act_order", [False, True], ids=["", "act-order"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("format, sym", [("gptq", True), ("gptq-v2", False), ("gptq-v2", True)],
                         ids=["gptq-sym", "gptq-v2-asym", "gptq-v2-sym"])
def test_gptqmodel_reads_our_export_to_the_same_logits(make_llama, tiny_tokenizer, token_batches, tmp_path, format,
                                                       sym, bits, act_order):
    folder = export(make_llama, tiny_tokenizer, token_batches, tmp_path / "out", format, bits, sym, act_order)
    ids = token_batches(2, 16, seed=9)
    with torch.no_grad():
        ours = compquant.load_model(str(folder)).model(ids).logits
    torch.testing.assert_close(gptqmodel_logits(folder, ids), ours, rtol=1e-5, atol=1e-5)


def test_gptqmodel_refuses_asymmetric_v1_from_other_producers_and_reads_its_numbers_right(
        make_llama, tiny_tokenizer, token_batches, tmp_path):
    """GPTQModel loads an asymmetric v1 checkpoint only when its own config names GPTQModel as the
    producer (older AutoGPTQ wrote such checkpoints with the zero-point bug), so compquant's
    asymmetric runs go to gptq-v2 for GPTQModel. On a copy whose config claims that producer, the
    v1 numbers (zeros stored minus one) still read back right."""
    folder = export(make_llama, tiny_tokenizer, token_batches, tmp_path / "v1", "gptq", 4, False, False)
    ids = token_batches(2, 16, seed=9)
    with pytest.raises(ValueError, match="sym=False model with format=FORMAT.GPTQ is only supported if produced by "
                                         "gptqmodel"):
        gptqmodel_logits(folder, ids)
    claimed = shutil.copytree(folder, tmp_path / "v1-claimed")
    config = json.loads((claimed / "config.json").read_text())
    config["quantization_config"]["meta"]["quantizer"] = [f"gptqmodel:{gptqmodel.__version__}"]
    (claimed / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        ours = compquant.load_model(str(folder)).model(ids).logits
    torch.testing.assert_close(gptqmodel_logits(claimed, ids), ours, rtol=1e-5, atol=1e-5)
