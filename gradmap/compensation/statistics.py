"""Stage-2 statistics from the engine's stored hidden states: alignment with the dense model, mean shifts, and the
streamed Gram statistics of the projection fit.

Alignment. The pruned model keeps the dense layers with original indices ``kept = [k_0 < k_1 < ...]``. The output of
kept layer ``k_p`` in the pruned model is compared with the dense hidden state at the same depth of computation: the
dense state after the removed block that follows it, i.e. the dense input of layer ``k_{p+1}`` (= the dense output of
layer ``k_{p+1} - 1``); for the last kept layer, the dense output of the last layer ``L - 1``. With no removed block
after ``k_p``, this is simply the dense output of layer ``k_p``. The dense hidden states are the dense trajectory's
stored boundaries (a snapshot of the calibration trajectory taken before any layer was removed): no second model and
no second forward of the dense model.

Mean shift of kept layer p: :math:`\\frac{1}{N}\\sum_t \\|\\hat h_t - h^*_t\\|_2` over the N real (unpadded) calibration
tokens; the relative shift divides each term by :math:`\\|h^*_t\\|_2`.

Gram statistics (target as in ReplaceMe, arXiv 2505.02819 Eq. 4). With :math:`M` the down-projection output of kept
layer p, :math:`X` its output hidden state and :math:`Y = h^*` the aligned dense state, folding
:math:`W_{down} \\leftarrow T^\\top W_{down}` turns the layer output into :math:`X - M + M T`; the fit wants
:math:`M T \\approx Z = Y - X + M`. :math:`G = M^\\top M` and :math:`C = M^\\top Z` are accumulated in fp64 per
micro-batch (:func:`gradmap.projection.gram_accumulate_`, the native op), separately for each cross-validation group
of windows, and all-reduced over ranks. For families with a normalisation after the MLP (Gemma-2/3 sandwich norm,
:mod:`gradmap.adapters`) the target is the pre-norm ``Z = rms(M) · (Y − X + N(M)) ⊘ g`` (derivation there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine import Trajectory
from ..projection import gram_accumulate_

#: Positions at the start of every calibration window left out of the Gram statistics. A window cut from the middle of
#: a text begins an artificial sequence; its first token is the attention sink (Xiao et al., arXiv 2309.17453) and
#: carries outlier activations (Sun et al., arXiv 2402.17762), and short windows over-represent it (1/64 of the tokens
#: of a 64-token window, 1/1024 in 1024-token use). Measured on SmolLM2 (8×64 calibration, Gromov block 11–18 removed,
#: test PPL at 1024 tokens): with it in the fit the cross-validated calibration loss fell 7.52 → 6.88 nats while test
#: PPL rose 169 → 770; without it (1 or 4 positions skipped) the cross-validation refused the fold (169 kept); on
#: GradMAP's selection the fold helped either way (57.3 → 51.8 / 51.9 / 52.0). Our choice, not the paper's.
SKIP_FIRST = 1


def aligned_dense_layer(kept: list[int], position: int, num_dense_layers: int) -> int:
    """Original index of the dense layer whose OUTPUT is aligned with kept layer ``position``'s output.

    That is ``kept[position + 1] - 1`` (the dense input of the next kept layer), or ``num_dense_layers - 1`` for the
    last kept layer.
    """
    return (kept[position + 1] if position + 1 < len(kept) else num_dense_layers) - 1


def gap_positions(kept: list[int], num_dense_layers: int) -> list[int]:
    """Positions of kept layers that are directly followed by a removed block (one per gap).

    A removed block at the very start (layer 0 removed) has no kept layer before it and is not listed.
    """
    return [p for p in range(len(kept)) if aligned_dense_layer(kept, p, num_dense_layers) != kept[p]]


def mean_shifts(traj: Trajectory, dense: Trajectory) -> tuple[list[float], list[float]]:
    """Mean and relative mean shift of every kept layer's output against its aligned dense hidden state.

    Args:
        traj: the calibration trajectory through the pruned (live) view.
        dense: the calibration trajectory through the dense view (same windows; its boundaries are read).

    Returns:
        ``(shift, relative_shift)``: one float per kept position, in hidden-state units; all ranks' tokens.
    """
    n_dense = dense.n
    kept = traj.view.kept
    sums = torch.zeros(2 * len(kept) + 1, dtype=torch.float64)  # abs sums, relative sums, tokens

    def observe(position, orig, k, h_in, h_out):
        real = traj.mask(k).bool()
        target = dense.state(aligned_dense_layer(kept, position, n_dense) + 1, k)[real].double()
        dist = (h_out[real].double() - target).norm(dim=-1)
        sums[position] += float(dist.sum())
        sums[len(kept) + position] += float((dist / target.norm(dim=-1).clamp_min(1e-12)).sum())
        if position == 0:
            sums[-1] += int(real.sum())

    traj.walk(observe)
    traj.engine.all_reduce_(sums)
    tokens = float(sums[-1])
    return (sums[:len(kept)] / tokens).tolist(), (sums[len(kept):-1] / tokens).tolist()


@dataclass
class GramStats:
    """Per-group Gram statistics of one kept layer: ``G[g] = MᵀM``, ``C[g] = MᵀZ`` (fp64 ``[d, d]`` on the device)
    and ``z[g] = ‖Z‖²`` (fp64 float) over the windows of group ``g``, all ranks; the real tokens that fed them
    (``tokens``) and their split by group (``group_tokens``; empty when unknown)."""

    G: list[torch.Tensor]
    C: list[torch.Tensor]
    tokens: int
    z: list[float]
    group_tokens: list[int] = field(default_factory=list)
    _total: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def total(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_g G[g], Σ_g C[g])``: the statistics of all windows (summed in place once, then cached: callers must
        not modify them)."""
        if self._total is None:
            G, C = self.G[0].clone(), self.C[0].clone()
            for g in range(1, len(self.G)):
                G.add_(self.G[g])
                C.add_(self.C[g])
            self._total = (G, C)
        return self._total


def gram_statistics(traj: Trajectory, dense: Trajectory, position: int, *, skip_first: int = SKIP_FIRST
                    ) -> GramStats:
    """Stream the Gram statistics of kept layer ``position`` (module docstring), per cross-validation group.

    The layer is recomputed once per micro-batch from the stored hidden states entering it (with the view's current
    overrides), with a hook reading its ``down_proj`` output ``M``; ``X`` is its output and ``Y`` the dense
    trajectory's boundary after the aligned dense layer.

    Args:
        skip_first: the first positions of every window left out of ``G`` and ``C`` (:data:`SKIP_FIRST`); they still
            run through the model as context.

    Raises:
        ValueError: ``skip_first`` < 0, or the statistics hold NaN/inf (overflowed activations).
    """
    if skip_first < 0:
        raise ValueError(f"skip_first: must be >= 0, got {skip_first}")
    engine, adapter = traj.engine, traj.engine.adapter
    kept = traj.view.kept
    orig = kept[position]
    aligned = aligned_dense_layer(kept, position, dense.n)
    groups = traj.windows.group_batches()
    d = engine.config.hidden_size
    # one buffer for every group's G and C: accumulated in place, all-reduced in place (no stacked copy)
    flat = torch.zeros(2 * len(groups), d, d, dtype=torch.float64, device=engine.device)
    G, C = list(flat[:len(groups)]), list(flat[len(groups):])
    tokens = torch.zeros(1 + 2 * len(groups), dtype=torch.float64)  # tokens, z per group, tokens per group
    traj.forward(upto=position)
    got: dict = {}

    def scope(module):
        norm = adapter.post_mlp_norm(module)
        handle = adapter.down_proj(module).register_forward_hook(lambda m, a, o: got.__setitem__("down", o.detach()))
        if norm is not None:
            # RMSNorm gain g: N(c·1) = g for a large constant vector (rms = c, eps negligible).
            with torch.no_grad():
                gain = norm(torch.full((1, d), 1e3, dtype=engine.dtype, device=engine.device)).double()[0]
            got["gain_inv"] = torch.where(gain.abs() > 1e-6, 1.0 / gain, torch.zeros_like(gain))
            got["norm"] = norm
        return _Remove(handle)

    with engine.layer(orig, traj.view, scope=scope) as run, torch.no_grad():
        for k, _ in traj.batches:
            h_in = traj.state(position, k)
            x = run(h_in, traj.inputs(k))
            used = traj.mask(k).clone()
            used[:, :skip_first] = 0
            real = used.bool().flatten()
            m = got["down"].reshape(-1, d)[real]  # OPT's fc2 sees [batch * seqlen, ffn] already flattened
            x = x.flatten(0, 1)[real]
            y = dense.state(aligned + 1, k).flatten(0, 1)[real]
            if "norm" not in got:
                target = y.double() - x.double() + m.double()
            else:  # sandwich norm: pre-norm target Z = rms(M) · (Y − X + N(M)) ⊘ g
                nm = got["norm"](m).double()
                rms = m.double().square().mean(-1, keepdim=True).sqrt()
                target = rms * (y.double() - x.double() + nm) * got["gain_inv"]
            g = next(i for i, members in enumerate(groups) if k in members)
            gram_accumulate_(G[g], C[g], m, target)
            tokens[0] += int(real.sum())
            tokens[1 + g] += float(target.square().sum())
            tokens[1 + len(groups) + g] += int(real.sum())
    engine.all_reduce_(flat)
    engine.all_reduce_(tokens)
    if not torch.isfinite(flat).all():
        raise ValueError(f"stage 2: the Gram matrix of layer {orig} holds NaN/inf: the activations overflowed "
                         "(float16?); rerun with dtype bfloat16 or float32, or --compensate none")
    n = len(groups)
    return GramStats(G, C, int(tokens[0]), tokens[1:1 + n].tolist(), [int(t) for t in tokens[1 + n:].tolist()])


class _Remove:
    """Context manager removing a hook handle on exit."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
