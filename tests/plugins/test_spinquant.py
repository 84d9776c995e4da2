import torch

import compquant
from compquant import QuantConfig
from compquant.core.online import online_ops
from compquant.core.quantizer import Grid
from compquant.core.transform import TransformContext
from compquant.models.llama import LLAMA
from compquant.plugins import spinquant
from compquant.plugins.hadamard import OnlineHadamard
from compquant.plugins.spinquant import SpinQuant


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_spinquant_learns_rotations_that_preserve_the_function(make_llama, token_batches, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPQUANT_CACHE_DIR", str(tmp_path))
    model = make_llama(tie=True, kv_heads=2)
    ids = token_batches(2, 24, seed=4)
    reference = logits(model, ids)
    transform = SpinQuant()
    context = TransformContext(calibration=token_batches(8, 16), grid=Grid(bits=3, group_size=32))
    transform.apply(model, LLAMA, transform.options({"steps": 5, "batch_size": 2, "r3": True}), context)
    assert (logits(model, ids) - reference).norm() / reference.norm() < 1e-4
    assert [type(op) for op in online_ops(model.model.layers[0].self_attn, "key")] == [OnlineHadamard]
    (saved,) = (tmp_path / "spinquant").glob("*.safetensors")
    from safetensors.torch import load_file

    rotations = load_file(str(saved))
    r1, r2 = rotations["R1"], rotations["R2"]
    assert r2.shape == (2, 16, 16)
    torch.testing.assert_close(r1.T @ r1, torch.eye(64, dtype=r1.dtype), atol=1e-5, rtol=0)
    assert not torch.allclose(r1.abs(), torch.full_like(r1, 64**-0.5))  # learned, no longer a Hadamard


def test_training_lowers_the_fake_quantized_loss(make_llama, token_batches):
    model = make_llama()
    calibration = token_batches(4, 32)
    grid = Grid(bits=2, group_size=-1)
    options = SpinQuant().options({"steps": 30, "lr": 0.5, "batch_size": 4})
    from compquant.plugins.quarot import prepare_for_rotation, rotate_mlp_output

    prepare_for_rotation(model, LLAMA)
    rotate_mlp_output(model, LLAMA)
    frozen = {name: p.detach() for name, p in model.named_parameters()}

    def loss(r1, r2):
        weights = spinquant._rotated_weights(model, LLAMA, frozen, r1.float(), [r.float() for r in r2], grid)
        with torch.no_grad():
            return torch.func.functional_call(model, weights, (calibration,), {"labels": calibration}).loss.item()

    from compquant.plugins.hadamard import random_hadamard

    generator = torch.Generator().manual_seed(0)
    start = loss(random_hadamard(64, generator), [random_hadamard(16, generator) for _ in range(2)])
    r1, r2 = spinquant.learn_rotations(model, LLAMA, calibration, grid, options, seed=0)
    assert loss(r1, r2) < start


def test_second_run_reuses_the_learned_rotations(make_llama, token_batches, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPQUANT_CACHE_DIR", str(tmp_path))
    calls = []
    real = spinquant.learn_rotations
    monkeypatch.setattr(spinquant, "learn_rotations", lambda *a, **k: calls.append(1) or real(*a, **k))
    calibration = token_batches(4, 16)
    results = []
    for r3 in (False, True):  # R3 changes neither training nor weights, so it does not retrain
        config = QuantConfig(solver="rtn", transforms=["spinquant"], grid={"bits": 4, "group_size": 32},
                             transform_options={"spinquant": {"steps": 3, "batch_size": 2, "r3": r3}})
        model = make_llama()
        compquant.quantize(model, config, calibration=calibration)
        results.append(logits(model, calibration))
    assert len(calls) == 1
    torch.testing.assert_close(results[0], results[1])


def test_spinquant_composes_with_the_compensation_solvers(make_llama, token_batches, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPQUANT_CACHE_DIR", str(tmp_path))
    for solver in ("gptq", "gptaq", "rescomp"):
        model = make_llama()
        config = QuantConfig(solver=solver, transforms=["spinquant"], transform_options={"spinquant": {"steps": 2, "batch_size": 2}},
                             grid={"bits": 3, "group_size": 32})
        report = compquant.quantize(model, config, calibration=token_batches(2, 16))
        assert len(report.layers) == 14
