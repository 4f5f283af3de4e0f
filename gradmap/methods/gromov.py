"""Angular distance between hidden states n layers apart (Gromov et al., "The Unreasonable Ineffectiveness of the
Deeper Layers", arXiv 2403.17887, Sec. 3.2, Eq. 7), one-shot, contiguous block.

:math:`d(h_l, h_{l+n}) = \\frac{1}{\\pi} \\arccos\\frac{h_{l,T}^\\top h_{l+n,T}}{\\|h_{l,T}\\|\\,\\|h_{l+n,T}\\|}`, on
the last real token :math:`T` of each calibration sequence, averaged over the sequences. :math:`d \\in [0, 1]`; 0 means
the block ``l .. l+n-1`` leaves the last token's direction unchanged. The block with the smallest ``d`` is removed.
Cost: one forward of the decoder stack (every block size is read from the same hidden states).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import get_adapter
from ..data import Calibration
from ..pruning import Selection, Step
from .common import Timer, hidden_states_per_layer, remove_by_original


def angular_distances(model: nn.Module, calibration: Calibration, block_sizes: list[int], *,
                      micro_batch: int = 8) -> tuple[dict[int, torch.Tensor], float]:
    """Angular distance of every contiguous block of each size in ``block_sizes`` (module docstring formula).

    Returns:
        ``({n: d}, seconds)``: ``d`` fp64 ``[L - n + 1]`` on CPU, ``d[l]`` for the block starting at current layer
        ``l``, every value in [0, 1]; wall time in seconds.

    Raises:
        ValueError: a block size outside [1, L].
    """
    adapter = get_adapter(model)
    n_layers = len(adapter.layers(model))
    bad = [n for n in block_sizes if not 1 <= n <= n_layers]
    if bad:
        raise ValueError(f"block_sizes: {bad} outside [1, {n_layers}]")
    sums = {n: torch.zeros(n_layers - n + 1, dtype=torch.float64) for n in block_sizes}
    sequences = 0
    with Timer() as t:
        for ids, mask in calibration.batches(micro_batch):
            states = hidden_states_per_layer(model, ids, mask, adapter)
            last = (mask.sum(dim=1) - 1).clamp_min(0).to(states[0].device)  # right padding: last real position
            rows = torch.arange(ids.shape[0], device=last.device)
            h = torch.stack([s[rows, last].double() for s in states])  # [L+1, batch, hidden]
            for n, acc in sums.items():
                cos = torch.nn.functional.cosine_similarity(h[:-n], h[n:], dim=-1).clamp(-1.0, 1.0)
                acc += (torch.arccos(cos) / math.pi).sum(dim=1).cpu()
            sequences += ids.shape[0]
    return {n: acc / sequences for n, acc in sums.items()}, t.seconds


def select_gromov(model: nn.Module, calibration: Calibration, target: int, *, protected=(), micro_batch: int = 8,
                  kept: list[int] | None = None) -> Selection:
    """Remove the contiguous block of ``target`` layers with the smallest angular distance from ``model`` IN PLACE.

    Blocks containing a protected layer are not candidates. The step scores are keyed by the block's first ORIGINAL
    index; :attr:`Selection.layer_scores` holds the single-layer (n = 1) distances, the per-layer fidelity input.

    Raises:
        ValueError: every block of ``target`` layers contains a protected layer.
    """
    kept = list(range(len(get_adapter(model).layers(model)))) if kept is None else list(kept)
    sizes = sorted({target, 1})
    dist, seconds = angular_distances(model, calibration, sizes, micro_batch=micro_batch)
    protected = {int(p) for p in protected}
    blocks = {kept[s]: float(d) for s, d in enumerate(dist[target].tolist())}
    allowed = [(d, s) for s, d in enumerate(dist[target].tolist())
               if not protected & set(kept[s:s + target])]
    if not allowed:
        raise ValueError(f"protected: every block of {target} contiguous layers contains a protected layer")
    _, start = min(allowed)
    victims = kept[start:start + target]
    selection = Selection(method="gromov", passes=1,
                          layer_scores={kept[i]: float(d) for i, d in enumerate(dist[1].tolist())},
                          extra={"block_start": kept[start], "block_size": target, "distance": blocks[kept[start]]})
    for k, victim in enumerate(victims):
        selection.removed.append(victim)
        selection.steps.append(Step(k, dict(blocks), victim, seconds if k == 0 else 0.0))
    remove_by_original(model, victims, kept)
    return selection
