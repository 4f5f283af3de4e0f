"""Summed next-token cross-entropy of an LM head applied to hidden states (interim full-logits implementation; the
chunked/fused kernel replaces this module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias=None,
                         softcap: float | None = None, ignore_index: int = -100, chunk_size: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Σ over rows with ``targets != ignore_index`` of ``−log softmax(hidden Wᵀ + b)[target]`` (fp32 scalar, nats).

    ``hidden`` ``[N, d]``, ``weight`` ``[V, d]``, ``targets`` ``[N]``; ``softcap`` c maps logits z → c·tanh(z/c).
    """
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
