"""Perplexity of a causal LM on a token stream (sliding windows).

The stream is cut into windows of ``seqlen`` tokens starting every ``stride`` tokens; each window scores only the
tokens not already scored by the previous window (all of them when ``stride == seqlen``), with the window's earlier
tokens as context. PPL = exp(mean NLL over scored tokens), the standard fixed-length evaluation used by the
layer-pruning literature (e.g. SLEB, arXiv 2402.09025, Sec. 5.1, with stride = seqlen).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import model_device


@dataclass
class Perplexity:
    """Perplexity result: ``ppl``, mean ``nll`` (nats/token), scored ``tokens``, ``seqlen``, ``stride``,
    wall ``seconds`` and ``tokens_per_s`` (scored tokens per second)."""

    ppl: float
    nll: float
    tokens: int
    seqlen: int
    stride: int
    seconds: float
    tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(model: nn.Module, token_ids: torch.Tensor, *, seqlen: int = 1024, stride: int | None = None,
               max_tokens: int | None = None, micro_batch: int = 4, progress: bool = False) -> Perplexity:
    """Perplexity of ``model`` on ``token_ids``.

    Args:
        token_ids: LongTensor ``[num_tokens]``; only the first ``max_tokens`` are used when given.
        seqlen: window length in tokens (≤ the model's ``max_position_embeddings``).
        stride: tokens between window starts (``None``: ``seqlen``; otherwise must be in [1, seqlen]; 0 is refused).
        micro_batch: windows per forward.

    Returns:
        :class:`Perplexity`.

    Raises:
        ValueError: bad ``seqlen``/``stride``/``max_tokens``/``micro_batch``, ``seqlen`` above the model's limit, or
            fewer than 2 tokens.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens: must be >= 2 (or None for all tokens), got {max_tokens}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch: must be >= 1, got {micro_batch}")
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise ValueError(f"seqlen: must be >= 2, got {seqlen}")
    if not 1 <= stride <= seqlen:
        raise ValueError(f"stride: must be in [1, seqlen={seqlen}], got {stride}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen: {seqlen} exceeds the model's maximum sequence length {limit}")
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    n = ids.numel()
    if n < 2:
        raise ValueError(f"evaluation text has {n} tokens; need at least 2")
    # windows: (begin, end, first scored position within the window)
    windows = []
    scored_until = 1  # token 0 has no context and is never scored
    begin = 0
    while scored_until < n:
        end = min(begin + seqlen, n)
        windows.append((begin, end, max(scored_until, begin + 1) - begin))
        scored_until = end
        if end == n:
            break
        begin += stride
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        batches = [windows[i:i + micro_batch] for i in range(0, len(windows), micro_batch)]
        for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
            width = max(e - b for b, e, _ in batch)
            inp = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, (b, e, first) in enumerate(batch):
                inp[r, : e - b] = ids[b:e]
                mask[r, : e - b] = 1
                labels[r, first: e - b] = ids[b + first:e]
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device), use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device),
                                  ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((labels[:, 1:] != -100).sum())
    seconds = time.perf_counter() - start
    mean = total_nll / total_tokens
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total_tokens, seqlen=seqlen, stride=stride,
                      seconds=seconds, tokens_per_s=total_tokens / max(seconds, 1e-9))
