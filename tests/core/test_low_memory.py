"""Low-memory mode: one block in memory at a time, and the same result as the in-memory run."""
import pytest
import torch
from safetensors.torch import load_file

import compquant
from compquant import QuantConfig
from compquant.core.low_memory import quantize_low_memory
from compquant.core.plugin_manager import create_plugin_manager


@pytest.fixture
def sharded_model(make_llama, tiny_tokenizer, tmp_path):
    folder = tmp_path / "tiny-llama"
    make_llama(tie=True).save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


class WeightsInMemory:
    """Records, at every quantized linear, which blocks and outside modules hold real weights."""

    def __init__(self, model, folder):
        self.model, self.folder = model, folder
        self.seen = []

    @compquant.hookimpl
    def compquant_after_layer(self, name, layer, result, report):
        loaded = [i for i, block in enumerate(self.model.model.layers) if not block.mlp.up_proj.weight.is_meta]
        shards_on_disk = len(list(self.folder.glob(".streamed.*/shard-*")))
        self.seen.append((loaded, self.model.model.embed_tokens.weight.is_meta, shards_on_disk))


@pytest.mark.parametrize("format", ["fake", "compressed-tensors"])
def test_block_by_block_equals_the_in_memory_run(sharded_model, token_batches, tmp_path, format):
    config = QuantConfig(solver="gptaq", grid={"bits": 3, "group_size": 32, "sym": True})
    calibration = token_batches(4, 16)
    loaded = compquant.load_model(str(sharded_model))
    report = compquant.quantize(loaded.model, config, calibration=calibration)
    compquant.save_quantized(loaded.model, loaded.tokenizer, tmp_path / "resident", config=config, report=report,
                             format=format)

    skeleton = compquant.load_model(str(sharded_model), low_memory=True)
    watch = WeightsInMemory(skeleton.model, tmp_path)
    pm = create_plugin_manager()
    pm.register(watch)
    report = quantize_low_memory(skeleton.model, skeleton.weights, config, tmp_path / "streamed", tokenizer=skeleton.tokenizer,
                        calibration=calibration, format=format, plugin_manager=pm, max_shard_size="5GB")
    # one block, and no embeddings, in memory at a time; each finished block is on disk, not buffered
    assert watch.seen == [([0], True, 0)] * 7 + [([1], True, 1)] * 7
    assert all(record.codes.numel() == 0 for record in report.records.values())  # written, not kept

    resident = load_file(tmp_path / "resident" / "model.safetensors")
    streamed = {}
    for shard in (tmp_path / "streamed").glob("model-*.safetensors"):
        streamed.update(load_file(shard))
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    assert resident.keys() == streamed.keys()
    assert all(torch.equal(resident[key], streamed[key]) for key in resident)
    reloaded = compquant.load_model(str(tmp_path / "streamed")).model
    ids = token_batches(2, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits)


def test_transforms_and_non_safetensors_sources_are_refused(sharded_model, tmp_path):
    skeleton = compquant.load_model(str(sharded_model), low_memory=True)
    with pytest.raises(ValueError, match="transforms.*drop --low-memory"):
        quantize_low_memory(skeleton.model, skeleton.weights, QuantConfig(solver="rtn", transforms=["quarot"]),
                            tmp_path / "out")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(compquant.CompquantError, match="low-memory mode reads a local transformers folder"):
        compquant.load_model(str(gguf), low_memory=True)
