"""The GPTQ checkpoint format, read back by a reader written here from the format's description."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import compquant
from compquant import QuantConfig
from compquant.core.exporters import ExportError
from compquant.plugins.exporters.gptq import _pack


def autogptq_pack_3bit(column: list[int]) -> list[int]:
    """AutoGPTQ's 3-bit packing of 32 values into 3 words, as its loop spells it out: ten values,
    one split across the word boundary, ten, one split, ten."""
    words = [0, 0, 0]
    words[0] = sum(column[j] << (3 * j) for j in range(10)) | ((column[10] << 30) & 0xFFFFFFFF)
    words[1] = (column[10] >> 2) & 1
    words[1] |= sum(column[11 + j] << (3 * j + 1) for j in range(10)) | ((column[21] << 31) & 0xFFFFFFFF)
    words[2] = (column[21] >> 1) & 0x3
    words[2] |= sum(column[22 + j] << (3 * j + 2) for j in range(10))
    return [int(np.int32(np.uint32(w))) for w in words]


def unpack(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Value k of every run of 32 sits at bits [bits*k, bits*(k+1)) of the run's words."""
    words = packed.numpy().astype(np.uint32)
    if dim == 1:
        words = words.T
    values = np.zeros((count, words.shape[1]), dtype=np.int64)
    for start in range(0, count, 32):
        run = words[start // 32 * bits:(start // 32 + 1) * bits].astype(object)
        number = sum(run[i] << (32 * i) for i in range(bits))
        for k in range(min(32, count - start)):
            values[start + k] = [(int(n) >> (bits * k)) & (2**bits - 1) for n in number]
    return torch.from_numpy(values.T if dim == 1 else values)


def test_three_bit_packing_is_autogptqs_layout():
    values = torch.randint(0, 8, (64, 2), generator=torch.Generator().manual_seed(0))
    packed = _pack(values, 3, dim=0)
    for column in range(2):
        for run in range(2):
            expected = autogptq_pack_3bit(values[32 * run:32 * (run + 1), column].tolist())
            assert packed[3 * run:3 * (run + 1), column].tolist() == expected


def test_four_bit_packing_puts_value_k_at_shift_4k():
    values = torch.arange(16).remainder(16).reshape(16, 1)
    packed = _pack(values, 4, dim=0)
    assert [int(np.uint32(np.int32(w))) for w in packed[:, 0]] == [
        sum(int(values[8 * w + k]) << (4 * k) for k in range(8)) for w in range(2)]


def export(make_llama, token_batches, tmp_path, *, format="gptq", bits=4, group_size=32, sym=True, options=None):
    model = make_llama()
    config = QuantConfig(solver="gptq", grid={"bits": bits, "group_size": group_size, "sym": sym},
                         solver_options=options or {})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    output = compquant.save_quantized(model, None, tmp_path / "out", config=config, report=report, format=format)
    return model, output


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1], ids=["g32", "per-channel"])
@pytest.mark.parametrize("act_order", [False, True], ids=["", "act-order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_read_back_weights_equal_the_quantized_model(make_llama, token_batches, tmp_path, bits, group_size, act_order,
                                                     sym):
    model, output = export(make_llama, token_batches, tmp_path, bits=bits, group_size=group_size, sym=sym,
                           options={"act_order": act_order})
    tensors = load_file(output / "model.safetensors")
    section = json.loads((output / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "gptq" and section["checkpoint_format"] == "gptq"
    assert (section["bits"], section["group_size"], section["sym"]) == (bits, group_size, sym)
    assert section["desc_act"] == (act_order and group_size != -1)
    for name, module in model.named_modules():
        if not name.startswith("model.layers.") or not isinstance(module, torch.nn.Linear):
            continue
        out_features, in_features = module.weight.shape
        codes = unpack(tensors[f"{name}.qweight"], bits, in_features, dim=0)
        zeros = unpack(tensors[f"{name}.qzeros"], bits, out_features, dim=1) + 1  # v1 stores zero - 1
        g_idx = tensors[f"{name}.g_idx"].long()
        scales = tensors[f"{name}.scales"]
        weight = scales[g_idx] * (codes - zeros[g_idx])
        torch.testing.assert_close(weight.T, module.weight, rtol=1e-6, atol=1e-6)
        assert f"{name}.weight" not in tensors
    assert "lm_head.weight" in tensors


def test_v1_refuses_zero_points_it_would_misstore_and_v2_stores_them(make_llama, token_batches, tmp_path):
    model = make_llama()
    with torch.no_grad():  # a row whose first group is all non-negative gets a zero point of 0
        model.model.layers[0].mlp.up_proj.weight[0, :32].abs_()
    config = QuantConfig(solver="rtn", grid={"bits": 4, "group_size": 32})
    report = compquant.quantize(model, config)
    with pytest.raises(ExportError, match="zero point of 0.*gptq-v2"):
        compquant.save_quantized(model, None, tmp_path / "v1", config=config, report=report, format="gptq")
    assert list(tmp_path.iterdir()) == []
    output = compquant.save_quantized(model, None, tmp_path / "v2", config=config, report=report, format="gptq-v2")
    assert json.loads((output / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    tensors = load_file(output / "model.safetensors")
    zeros = unpack(tensors["model.layers.0.mlp.up_proj.qzeros"], 4, 128, dim=1)
    assert zeros[0, 0] == 0 and torch.equal(zeros.T, report.records["model.layers.0.mlp.up_proj"].zero.long())


@pytest.mark.parametrize("format", ["gptq", "gptq-v2"])
def test_compquant_loads_a_gptq_checkpoint_de_quantized(make_llama, tiny_tokenizer, token_batches, tmp_path, format):
    model = make_llama(tie=True)
    config = QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32}, solver_options={"act_order": True})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    output = compquant.save_quantized(model, tiny_tokenizer, tmp_path / "out", config=config, report=report,
                                      format=format)
    reloaded = compquant.load_model(str(output)).model
    ids = token_batches(2, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
