"""Shared fixtures: tiny random models, a tiny tokenizer and a tiny local data folder, all made
here so that no test needs a hub."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "The tower is 324 metres tall , about the same height as an 81 @-@ storey building .",
    "It was the first structure to reach a height of 300 metres in the world .",
    "Robert Boulter is an English film , television and theatre actor .",
    "He had a guest @-@ starring role on the television series The Bill in 2000 .",
    "The game began development in 2010 , carrying over a large portion of the work .",
    "Rainfall in the region is heavy in summer , and the rivers flood every few years .",
]


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPQUANT_NO_PROGRESS", "1")
    monkeypatch.delenv("COMPQUANT_DATA_DIR", raising=False)


def tiny_causal_lm(config, *, seed: int, norm_low: float = 0.5, norm_high: float = 1.5):
    """A random model of ``config`` whose norm weights are drawn from [norm_low, norm_high] (a fresh
    model's norms are all alike, which would hide a norm handled wrongly)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(norm_low, norm_high)
    return model


SMALL = {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 256}
"""The sizes every tiny language model here shares."""


@pytest.fixture
def live_forwards():
    """Lists the paused forwards (`compquant.core.paused_forward`) whose call stacks are still held:
    a run that ends, however it ends, leaves none."""
    import gc

    import greenlet

    def live() -> list:
        return [g for g in gc.get_objects()
                if isinstance(g, greenlet.greenlet) and g.parent is not None and g]  # true: started, not ended

    return live


@pytest.fixture
def make_llama():
    """Factory for a tiny random causal LM of the Llama family (2 layers, hidden 64); Qwen3 adds
    per-head q_norm/k_norm. ``head_dim`` other than hidden / heads makes q_proj wider than the
    hidden size, as in Qwen3."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}

    def make(family: str = "llama", *, tie: bool = False, seed: int = 0, vocab: int = 300, kv_heads: int = 2,
             head_dim: int = 16):
        config = configs[family](**{**SMALL, "vocab_size": vocab}, intermediate_size=128, num_key_value_heads=kv_heads,
                                 head_dim=head_dim, tie_word_embeddings=tie)
        return tiny_causal_lm(config, seed=seed)

    return make


@pytest.fixture
def make_gemma3():
    """Factory for a tiny random Gemma 3 text model: sandwich norms with ``1 + weight`` scales (weights
    drawn around 0), a sliding-window layer and a global one, scaled embedding, tied head. With
    ``even_output_norms`` every post-attention/post-feedforward norm scales all channels alike (the
    one case in which the residual stream can be rotated through them)."""
    from transformers import Gemma3TextConfig

    def make(*, even_output_norms: bool = False, seed: int = 0):
        config = Gemma3TextConfig(**SMALL, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
        model = tiny_causal_lm(config, seed=seed, norm_low=-0.5, norm_high=0.5)
        if even_output_norms:
            with torch.no_grad():
                for block in model.model.layers:
                    for norm in (block.post_attention_layernorm, block.post_feedforward_layernorm):
                        norm.weight.fill_(float(norm.weight[0]))
        return model

    return make


@pytest.fixture
def make_moe():
    """Factory for a tiny random sparse mixture-of-experts decoder as transformers 5 builds it (experts
    fused in 3-D tensors): ``qwen3_moe`` and ``mixtral`` (4 experts, top 2), ``qwen2_moe`` (adds a
    shared expert and its gate). The routers are scaled up so that tokens spread unevenly.
    ``dense_layers`` are Qwen-MoE's ``mlp_only_layers``: blocks with a dense MLP instead."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    def make(family: str = "qwen3_moe", *, seed: int = 0, experts: int = 4, dense_layers: tuple[int, ...] = ()):
        sizes = {**SMALL, "num_key_value_heads": 2, "head_dim": 16, "num_experts_per_tok": 2}
        if dense_layers:
            sizes["mlp_only_layers"] = list(dense_layers)
        if family == "mixtral":
            config = MixtralConfig(**sizes, intermediate_size=32, num_local_experts=experts)
        elif family == "qwen2_moe":
            config = Qwen2MoeConfig(**sizes, intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, num_experts=experts)
        else:
            config = Qwen3MoeConfig(**sizes, intermediate_size=96, moe_intermediate_size=32, num_experts=experts)
        model = tiny_causal_lm(config, seed=seed)
        with torch.no_grad():
            for index, block in enumerate(model.model.layers):
                if index not in dense_layers:
                    block.mlp.gate.weight.normal_(0.0, 0.5)
        return model

    return make


@pytest.fixture
def model_dir(make_llama, tiny_tokenizer, tmp_path):
    """A tiny Llama and its tokenizer saved as a local model folder."""
    folder = tmp_path / "tiny-llama"
    make_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a 300-token vocabulary, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>"], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<s>")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A local data folder laid out like shared/data, with distinct text in each split."""
    folder = tmp_path / "data"
    (folder / "wikitext-2-raw").mkdir(parents=True)
    (folder / "wikitext-2").mkdir(parents=True)
    test_lines = [" \n", " = Test article = \n", " \n"] + [f" {line} \n" for line in CORPUS[:3] * 20]
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(test_lines))
    valid_lines = [f" {line} <unk> \n" for line in CORPUS[3:] * 20]
    (folder / "wikitext-2" / "wiki.valid.tokens").write_text("".join(valid_lines))
    return folder


@pytest.fixture
def token_batches():
    """Factory: random token-id calibration windows (samples, seqlen) from a fixed seed."""

    def make(samples: int = 8, seqlen: int = 32, vocab: int = 300, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (samples, seqlen), generator=generator)

    return make


@pytest.fixture
def correlated_layer():
    """Factory: a weight (rows, columns) and correlated calibration inputs (tokens, columns)."""

    def make(rows: int = 32, columns: int = 128, tokens: int = 1024, seed: int = 0, dtype=torch.float32):
        generator = torch.Generator().manual_seed(seed)
        mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64) / columns**0.5
        inputs = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) @ mixing
        inputs += 0.05 * torch.randn(tokens, columns, generator=generator, dtype=torch.float64)
        weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
        return weight.to(dtype), inputs.to(dtype)

    return make


@pytest.fixture
def block_error():
    """Mean squared error of block 0's outputs in ``model`` against those in ``reference`` on
    ``batches``: what a learner minimises for that block (its inputs are the same in both, the
    embeddings are not quantized)."""

    def error(model, reference, batches) -> float:
        outputs = []
        for net in (model, reference):
            seen = []
            handle = net.model.layers[0].register_forward_hook(
                lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output))
            with torch.no_grad():
                for batch in batches:
                    net(batch)
            handle.remove()
            outputs.append(torch.cat(seen))
        return float(((outputs[0] - outputs[1]) ** 2).mean())

    return error
