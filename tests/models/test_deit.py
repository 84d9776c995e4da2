"""timm vision transformers through the DeiT adapter: contract, every solver end to end, reload,
image folders for calibration and top-1, and the refusal of rotations on LayerNorm models."""
import json

import pytest
import torch
from torch import nn

import compquant
from compquant import QuantConfig
from compquant.cli import main
from compquant.models.deit import DEIT

SOLVERS = [("rtn", {}), ("gptq", {}), ("gptaq", {}), ("rescomp", {}), ("rescomp", {"base": "gptq"})]


@pytest.fixture(params=["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def make_deit(request):
    import timm

    def make(seed: int = 0):
        torch.manual_seed(seed)
        overlay = dict(mean=(0.5,), std=(0.5,), input_size=(1, 16, 16), crop_pct=1.0, interpolation="bilinear")
        return timm.create_model(request.param, pretrained=False, img_size=16, patch_size=4, embed_dim=64, depth=2,
                                 num_heads=2, num_classes=3, in_chans=1, pretrained_cfg_overlay=overlay).eval()

    return make


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_adapter_names_exactly_the_quantizable_linears(make_deit):
    model = make_deit()
    assert DEIT.matches(model)
    for block in DEIT.block_list(model):
        linears = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        assert set(DEIT.linears()) == linears


@pytest.mark.parametrize("solver, options", SOLVERS)
def test_every_solver_quantizes_a_deit_and_the_reload_gives_the_same_logits(make_deit, solver, options, tmp_path):
    model = make_deit()
    config = QuantConfig(solver=solver, solver_options=options, grid={"bits": 4, "group_size": 32}, calibration={"batch_size": 4})
    report = compquant.quantize(model, config, calibration=images())
    assert [layer.name for layer in report.layers][:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert len(report.layers) == 8
    output = compquant.save_quantized(model, None, tmp_path / "q", config=config, report=report)
    assert (output / "model.safetensors").is_file()
    reloaded = compquant.load_model(str(output))
    assert reloaded.is_vision
    x = images(4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x), model(x), rtol=0, atol=0)


def test_a_learner_trains_each_deit_block_before_gptq(make_deit, tmp_path):
    model = make_deit()
    config = QuantConfig(solver="gptq", learner="sde", grid={"bits": 3, "group_size": 32}, calibration={"batch_size": 4},
                         learner_options={"epochs": 2, "lookahead": 1})
    report = compquant.quantize(model, config, calibration=images())
    assert [block.name for block in report.blocks] == ["blocks.0", "blocks.1"]
    reloaded = compquant.load_model(str(compquant.save_quantized(model, None, tmp_path / "q", config=config,
                                                                 report=report)))
    x = images(4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x), model(x), rtol=0, atol=0)


def test_rotations_are_refused_on_layernorm_models(make_deit):
    with pytest.raises(ValueError, match="LayerNorm.*RMSNorm models only"):
        compquant.quantize(make_deit(), QuantConfig(solver="rtn", transforms=["quarot"]))


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    generator = torch.Generator().manual_seed(0)
    for label in range(3):
        (folder / f"class{label}").mkdir(parents=True)
        for index in range(6):
            pixels = (torch.rand(16, 16, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(folder / f"class{label}" / f"{index}.png")
    return folder


def test_calibration_and_top1_read_an_image_folder_with_timms_transform(make_deit, image_folder):
    from compquant.evaluation.images import Preprocessed, image_source, top1_accuracy

    model = make_deit()
    dataset = Preprocessed(image_source(image_folder, "evaluation"), model)
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    assert batch.shape == (18, 1, 16, 16)
    with torch.no_grad():
        expected = (model(batch).argmax(dim=1) == labels).float().mean().item()
    assert top1_accuracy(model, image_folder, batch_size=5).top1 == pytest.approx(expected)
    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": -1}, calibration={"dataset": str(image_folder), "nsamples": 8})
    report = compquant.quantize(model, config)
    assert report.calibration_tokens == 8 * (16 + model.num_prefix_tokens)


def test_cli_quantizes_and_evaluates_a_timm_folder(make_deit, image_folder, tmp_path, capsys):
    from timm.models import save_for_hf

    source = tmp_path / "deit"
    save_for_hf(make_deit(), source)
    output = tmp_path / "deit-w4"
    assert main(["quantize", str(source), "--solver", "gptaq", "--bits", "4", "--group-size", "-1",
                 "--calib", str(image_folder), "--nsamples", "8", "-o", str(output), "-q"]) == 0
    result = tmp_path / "top1.json"
    assert main(["eval", str(output), "--imagefolder", str(image_folder), "--json", str(result), "-q"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert json.loads(result.read_text())["images"] == 18


def test_timm_name_without_checkpoint_offline_names_both_ways(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(compquant.CompquantError, match=r"--checkpoint.*folder saved by timm"):
        compquant.load_model("timm:deit_tiny_patch16_224")
