"""Perplexity of a causal LM on a token stream (sliding windows).

The stream is cut into windows of ``seqlen`` tokens starting every ``stride`` tokens; each window scores only the
tokens not already scored by the previous window (all of them when ``stride == seqlen``), with the window's earlier
tokens as context. PPL = exp(mean NLL over scored tokens), the standard fixed-length evaluation used by the
layer-pruning literature (e.g. SLEB, arXiv 2402.09025, Sec. 5.1, with stride = seqlen).

The windows run through the layer engine (:mod:`gradmap.engine`) like everything else: one decoder layer at a time
(a model bigger than memory streams), the LM head through the fused linear cross-entropy (no full logits), data
parallel over ranks. :func:`perplexity` takes a plain ``nn.Module`` and wraps it; :func:`view_perplexity` evaluates
any view of an engine (the dense model, the pruned one before and after compensation) without building it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .adapters import get_adapter, model_device
from .engine import IGNORE, Engine, ModelWeights, View, Windows


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
        """The fields as a JSON-ready dict."""
        return asdict(self)


def perplexity_windows(token_ids: torch.Tensor, *, seqlen: int = 1024, stride: int | None = None,
                       max_tokens: int | None = None, micro_batch: int = 4, max_length: int | None = None) -> Windows:
    """Cut a token stream into the windows of the module docstring, with targets only on the scored tokens.

    Args:
        token_ids: LongTensor ``[num_tokens]``; only the first ``max_tokens`` are used when given.
        seqlen: window length in tokens (≤ ``max_length``, the model's maximum, when given).
        stride: tokens between window starts (``None``: ``seqlen``; otherwise in [1, seqlen]).
        micro_batch: windows per forward.

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
    if max_length is not None and seqlen > max_length:
        raise ValueError(f"seqlen: {seqlen} exceeds the model's maximum sequence length {max_length}")
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    n = ids.numel()
    if n < 2:
        raise ValueError(f"evaluation text has {n} tokens; need at least 2")
    windows = []  # (begin, end, first scored position within the window)
    scored_until = 1  # token 0 has no context and is never scored
    begin = 0
    while scored_until < n:
        end = min(begin + seqlen, n)
        windows.append((begin, end, max(scored_until, begin + 1) - begin))
        scored_until = end
        if end == n:
            break
        begin += stride
    width = max(e - b for b, e, _ in windows)
    inp = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros(len(windows), width, dtype=torch.long)
    targets = torch.full((len(windows), width), IGNORE, dtype=torch.long)
    for r, (b, e, first) in enumerate(windows):
        inp[r, : e - b] = ids[b:e]
        mask[r, : e - b] = 1
        targets[r, first - 1: e - b - 1] = ids[b + first:e]  # position t predicts token t+1
    return Windows(inp, mask, targets, micro_batch)


def view_perplexity(engine: Engine, windows: Windows, view: View | None = None, *, seqlen: int,
                    stride: int) -> Perplexity:
    """Perplexity of ``view`` (default: the engine's live view) on ``windows`` (:func:`perplexity_windows`), one
    layer at a time, nothing stored but the current hidden states; all ranks' windows."""
    start = time.perf_counter()
    traj = engine.trajectory(windows, view=view.copy() if view is not None else engine.view.copy(), keep=False)
    try:
        total, count = traj.loss()
    finally:
        engine.release(traj)
    seconds = time.perf_counter() - start
    mean = total / max(count, 1)
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, seqlen=seqlen, stride=stride, seconds=seconds,
                      tokens_per_s=count / max(seconds, 1e-9))


def perplexity(model: nn.Module, token_ids: torch.Tensor, *, seqlen: int = 1024, stride: int | None = None,
               max_tokens: int | None = None, micro_batch: int = 4, progress: bool = False) -> Perplexity:
    """Perplexity of a resident ``model`` on ``token_ids`` (module docstring; windows as :func:`perplexity_windows`).

    The model is left as it was (``requires_grad`` flags and training mode restored).

    Raises:
        ValueError: see :func:`perplexity_windows`.
    """
    windows = perplexity_windows(token_ids, seqlen=seqlen, stride=stride, max_tokens=max_tokens,
                                 micro_batch=micro_batch,
                                 max_length=getattr(model.config, "max_position_embeddings", None))
    param = next(model.parameters())
    engine = Engine(ModelWeights(model, get_adapter(model), device=model_device(model), dtype=param.dtype),
                    progress=progress)
    try:
        return view_perplexity(engine, windows, seqlen=seqlen, stride=seqlen if stride is None else stride)
    finally:
        engine.close()
