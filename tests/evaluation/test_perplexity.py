import math

import torch
import torch.nn.functional as F

from compquant.evaluation.perplexity import perplexity, perplexity_of_tokens


def test_perplexity_is_exp_of_mean_window_nll(make_llama, token_batches):
    model = make_llama()
    ids = token_batches(1, 100).reshape(1, -1)
    result = perplexity_of_tokens(model, ids, seqlen=32, batch_size=2)
    assert result.windows == 3 and result.tokens == 96  # the 4-token tail is dropped
    windows = ids[0, :96].reshape(3, 32)
    with torch.no_grad():
        logits = model(windows).logits
    nll = [F.cross_entropy(logits[i, :-1], windows[i, 1:]).item() for i in range(3)]
    assert math.isclose(result.perplexity, math.exp(sum(nll) / 3), rel_tol=1e-5)


def test_limit_caps_the_windows(make_llama, tiny_tokenizer, data_dir):
    result = perplexity(make_llama(), tiny_tokenizer, "wikitext2", seqlen=16, limit=2, data_dir=data_dir)
    assert result.windows == 2 and result.perplexity > 1
