"""The LM loss the engine computes after the last decoder layer: final norm → LM head → (soft-cap) → summed NLL.

Next-token targets: position *t* of a window predicts token *t+1*; it counts when both positions are real
(``attention_mask == 1``) and, for perplexity windows that only score part of a window, when *t+1* is scored. Every
other position gets ``IGNORE`` (−100). The loss is the SUM of the token negative log-likelihoods in nats (divide by
the target count for the mean), computed by :func:`gradmap.kernels.linear_cross_entropy.linear_cross_entropy`
on the real rows only: the ``[tokens, vocabulary]`` logits are never materialised beyond one chunk. The final
norm and any family-specific step (OPT's ``project_out``, Gemma-2/3 final-logit soft-capping) come from the
:class:`~gradmap.adapters.Adapter`, so nothing is skipped silently.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapter
from ..kernels.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy

IGNORE = -100
#: ``GRADMAP_LOSS=full`` computes the loss from the full ``[tokens, vocabulary]`` logits (fp32, the reference of
#: :mod:`gradmap.kernels.linear_cross_entropy`) instead of the fused chunks: for checking that the fused path changes
#: no decision (benchmarks/bench_loss_prune.py), never faster or smaller.
LOSS_ENV = "GRADMAP_LOSS"


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       score_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets ``[batch, seqlen]`` for next-token prediction (module docstring), ``IGNORE`` where nothing counts.

    Args:
        input_ids, attention_mask: LongTensor ``[batch, seqlen]``.
        score_mask: optional bool ``[batch, seqlen]``: only tokens marked True are predicted (perplexity windows
            that overlap the previous one).
    """
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if score_mask is not None:
        valid &= score_mask[:, 1:].bool()
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(~valid, IGNORE)
    return targets


def head_nll(model: nn.Module, adapter: Adapter, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32 scalar, nats) of the last decoder layer's output ``hidden`` ``[batch, seqlen,
    hidden]`` against ``targets`` ``[batch, seqlen]`` (:func:`next_token_targets`).

    Differentiable w.r.t. ``hidden`` (the engine's backward sweep starts here). Only the rows with a target go through
    the final norm and the LM head. A float64 model (numerical checks) gets the exact full-logits loss in float64.
    """
    rows = targets != IGNORE
    if not bool(rows.any()):
        return hidden.sum() * 0.0
    h = adapter.final_hidden(model, hidden[rows])
    head = model.get_output_embeddings()
    bias, softcap = getattr(head, "bias", None), adapter.logit_softcap(model.config)
    if h.dtype == torch.float64:  # fp64 models (numerical checks): exact full logits, the fused kernels are fp32
        logits = F.linear(h, head.weight.double(), None if bias is None else bias.double())
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, targets[rows], reduction="sum")
    if os.environ.get(LOSS_ENV, "fused") == "full":
        return reference_linear_cross_entropy(h, head.weight, targets[rows], bias=bias, softcap=softcap,
                                              compute_dtype=torch.float32)
    return linear_cross_entropy(h, head.weight, targets[rows], bias=bias, softcap=softcap)
