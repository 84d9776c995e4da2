"""Perplexity the standard way: the evaluation split joined and tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens (the tail dropped), each window scored independently,
PPL = exp(mean over windows of the window's mean token NLL)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.finite import check_metric
from ..core.progress import progress
from .datasets import evaluation_tokens, warn_beyond_context

NON_FINITE_LOGITS = ("the model produced NaN or Inf logits, so the score means nothing; check its weights "
                     "(compquant quantize names any non-finite tensor) or evaluate in float32")


@dataclass(frozen=True)
class PerplexityResult:
    dataset: str
    perplexity: float
    seqlen: int
    windows: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    dataset: str = "wikitext2",
    *,
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the evaluation split of ``dataset``; ``limit`` caps the windows."""
    ids = evaluation_tokens(tokenizer, dataset, data_dir=data_dir)
    return perplexity_of_tokens(model, ids, dataset=dataset, seqlen=seqlen, limit=limit, batch_size=batch_size, device=device)


def perplexity_of_tokens(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    dataset: str = "tokens",
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 tokens (one to predict from, one to predict), got {seqlen}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of windows (or None for all of them), got {limit}")
    windows = ids.numel() // seqlen
    if windows == 0:
        raise ValueError(f"the {dataset} text has {ids.numel()} tokens, which make no window of {seqlen}; lower seqlen")
    if limit is not None:
        windows = min(windows, limit)
    warn_beyond_context(model, seqlen)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    data = ids.reshape(-1)[: windows * seqlen].reshape(windows, seqlen)
    nlls = []
    with torch.inference_mode():
        for batch in progress(data.split(batch_size), desc=f"perplexity {dataset}, batches of {batch_size} windows",
                              total=math.ceil(windows / batch_size)):
            batch = batch.to(device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
            nlls.append(loss.view(batch.shape[0], -1).mean(dim=1).cpu())
    mean_nll = torch.cat(nlls).double().mean().item()
    check_metric(f"the {dataset} perplexity", mean_nll, NON_FINITE_LOGITS)
    return PerplexityResult(dataset, math.exp(mean_nll), seqlen, windows, windows * seqlen)
