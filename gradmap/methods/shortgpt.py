"""ShortGPT Block Influence (Men et al., arXiv 2403.03853, Sec. 3.2, Eq. 1), one-shot.

:math:`BI_l = 1 - \\mathbb{E}_t \\frac{h_{l,t}^\\top h_{l+1,t}}{\\|h_{l,t}\\|\\,\\|h_{l+1,t}\\|}`, with :math:`h_l` the
hidden state entering layer *l* and :math:`h_{l+1}` the one leaving it, averaged over the real (unpadded) tokens of the
calibration set. Lower = the layer changes its input less = removed first. Cost: one forward of the decoder stack
(read from the engine's stored boundaries when they are already there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine import Trajectory
from .base import Selection, Timer, apply_removals, one_shot_selection


def block_influence(traj: Trajectory) -> tuple[torch.Tensor, float]:
    """Block Influence of every decoder layer of the trajectory's view (formula in the module docstring).

    Returns:
        ``(scores, seconds)``: fp32 ``[num_positions]`` on CPU and the wall time in seconds. Sums are all-reduced
        over ranks.
    """
    sums = torch.zeros(traj.n + 1, dtype=torch.float64)  # last entry: the token count

    def observe(position, orig, k, h_in, h_out):
        real = traj.mask(k).bool()
        cos = F.cosine_similarity(h_in[real].float(), h_out[real].float(), dim=-1)
        sums[position] += float(cos.double().sum())
        if position == 0:
            sums[-1] += int(real.sum())

    with Timer() as t:
        traj.walk(observe)
        traj.engine.all_reduce_(sums)
    return (1.0 - sums[:-1] / sums[-1]).float(), t.seconds


def select_shortgpt(traj: Trajectory, target: int, *, protected=(), budget=None) -> Selection:
    """Remove the ``target`` layers of lowest Block Influence from the engine's live view (one forward, one-shot)."""
    engine = traj.engine
    kept = list(engine.view.kept)
    work0 = engine.work
    scores, seconds = block_influence(traj)
    by_orig = {orig: float(s) for orig, s in zip(kept, scores.tolist())}
    selection = one_shot_selection("shortgpt", by_orig, target, protected, seconds,
                                   passes=traj.passes(engine.work - work0))
    return apply_removals(engine, selection, budget)
