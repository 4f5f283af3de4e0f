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

from ..engine import Trajectory
from .base import Selection, Step, Timer, apply_removals


def angular_distances(traj: Trajectory, block_sizes: list[int]) -> tuple[dict[int, torch.Tensor], float]:
    """Angular distance of every contiguous block of each size in ``block_sizes`` (module docstring formula).

    Returns:
        ``({n: d}, seconds)``: ``d`` fp64 ``[L - n + 1]`` on CPU, ``d[l]`` for the block starting at position ``l``,
        every value in [0, 1]; wall time in seconds. Sums are all-reduced over ranks.

    Raises:
        ValueError: a block size outside [1, L].
    """
    n_layers = traj.n
    bad = [n for n in block_sizes if not 1 <= n <= n_layers]
    if bad:
        raise ValueError(f"block_sizes: {bad} outside [1, {n_layers}]")
    last_states: dict[int, list] = {}  # micro-batch -> [h_0 .. h_L] at each sequence's last real token

    def observe(position, orig, k, h_in, h_out):
        mask = traj.mask(k)
        last = (mask.sum(dim=1) - 1).clamp_min(0)  # right padding: last real position
        rows = torch.arange(mask.shape[0], device=mask.device)
        states = last_states.setdefault(k, [])
        if position == 0:
            states.append(h_in[rows, last].double())
        states.append(h_out[rows, last].double())

    with Timer() as t:
        traj.walk(observe)
        sums = {n: torch.zeros(n_layers - n + 1, dtype=torch.float64) for n in block_sizes}
        sequences = torch.zeros(1, dtype=torch.float64)
        for states in last_states.values():
            h = torch.stack(states)  # [L+1, batch, hidden]
            for n, acc in sums.items():
                cos = torch.nn.functional.cosine_similarity(h[:-n], h[n:], dim=-1).clamp(-1.0, 1.0)
                acc += (torch.arccos(cos) / math.pi).sum(dim=1).cpu()
            sequences += h.shape[1]
        for acc in sums.values():
            traj.engine.all_reduce_(acc)
        traj.engine.all_reduce_(sequences)
    return {n: acc / float(sequences) for n, acc in sums.items()}, t.seconds


def select_gromov(traj: Trajectory, target: int, *, protected=(), budget=None) -> Selection:
    """Remove the contiguous block of ``target`` layers with the smallest angular distance from the live view.

    Blocks containing a protected layer are not candidates. The step scores are keyed by the block's first ORIGINAL
    index; :attr:`Selection.layer_scores` holds the single-layer (n = 1) distances, the per-layer fidelity input.

    Raises:
        ValueError: every block of ``target`` layers contains a protected layer.
    """
    engine = traj.engine
    kept = list(engine.view.kept)
    work0 = engine.work
    sizes = sorted({target, 1})
    dist, seconds = angular_distances(traj, sizes)
    protected = {int(p) for p in protected}
    blocks = {kept[s]: float(d) for s, d in enumerate(dist[target].tolist())}
    allowed = [(d, s) for s, d in enumerate(dist[target].tolist()) if not protected & set(kept[s:s + target])]
    if not allowed:
        raise ValueError(f"protected: every block of {target} contiguous layers contains a protected layer")
    _, start = min(allowed)
    victims = kept[start:start + target]
    selection = Selection(method="gromov", passes=traj.passes(engine.work - work0),
                          layer_scores={kept[i]: float(d) for i, d in enumerate(dist[1].tolist())},
                          extra={"block_start": kept[start], "block_size": target, "distance": blocks[kept[start]]})
    for k, victim in enumerate(victims):
        selection.removed.append(victim)
        selection.steps.append(Step(k + 1, dict(blocks), victim, seconds if k == 0 else 0.0))
    return apply_removals(engine, selection, budget)
