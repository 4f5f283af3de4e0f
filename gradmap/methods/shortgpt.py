"""ShortGPT Block Influence (Men et al., arXiv 2403.03853, Sec. 3.2, Eq. 1), one-shot.

:math:`BI_l = 1 - \\mathbb{E}_t \\frac{h_{l,t}^\\top h_{l+1,t}}{\\|h_{l,t}\\|\\,\\|h_{l+1,t}\\|}`, with :math:`h_l` the
hidden state entering layer *l* and :math:`h_{l+1}` the one leaving it, averaged over the real (unpadded) tokens of the
calibration set. Lower = the layer changes its input less = removed first. Cost: one forward of the decoder stack.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import get_adapter
from ..data import Calibration
from ..pruning import Selection
from .common import Timer, hidden_states_per_layer, one_shot_selection, remove_by_original


def block_influence(model: nn.Module, calibration: Calibration, *, micro_batch: int = 8) -> tuple[torch.Tensor, float]:
    """Block Influence of every decoder layer (formula in the module docstring).

    Returns:
        ``(scores, seconds)``: fp32 ``[num_layers]`` on CPU (current positions) and the wall time in seconds.
    """
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    sums = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    with Timer() as t:
        for ids, mask in calibration.batches(micro_batch):
            states = hidden_states_per_layer(model, ids, mask, adapter)
            real = mask.bool().flatten().to(states[0].device)
            flat = [h.flatten(0, 1)[real].float() for h in states]
            for i in range(n):
                sums[i] += torch.nn.functional.cosine_similarity(flat[i], flat[i + 1], dim=-1).double().sum().cpu()
            tokens += int(real.sum())
    return (1.0 - sums / tokens).float(), t.seconds


def select_shortgpt(model: nn.Module, calibration: Calibration, target: int, *, protected=(), micro_batch: int = 8,
                    kept: list[int] | None = None) -> Selection:
    """Remove the ``target`` layers of lowest Block Influence from ``model`` IN PLACE (one forward, one-shot)."""
    kept = list(range(len(get_adapter(model).layers(model)))) if kept is None else list(kept)
    scores, seconds = block_influence(model, calibration, micro_batch=micro_batch)
    by_orig = {orig: float(s) for orig, s in zip(kept, scores.tolist())}
    selection, victims = one_shot_selection("shortgpt", by_orig, target, protected, seconds, passes=1)
    remove_by_original(model, victims, kept)
    return selection
