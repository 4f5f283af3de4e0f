"""Stage 2 of GradMAP: measure the hidden-state mean shift, fit a projection in closed form, fold it into ``down_proj``.

GradMAP (arXiv 2602.14649, Sec. 3, stage 2) finds the layer whose hidden states drift most from the dense model after
pruning and corrects the drift with one projection matrix, reparameterised into that layer's down projection, so the
result keeps the plain architecture.

Alignment. The pruned model keeps the dense layers with original indices ``kept = [k_0 < k_1 < ...]``. The output of
kept layer ``k_p`` in the pruned model is compared with the dense hidden state at the same depth of computation: the
dense state after the removed block that follows it, i.e. the dense input of layer ``k_{p+1}`` (= the dense output of
layer ``k_{p+1} - 1``); for the last kept layer, the dense output of the last layer ``L - 1``. With no removed block
after ``k_p``, this is simply the dense output of layer ``k_p``.

Mean shift of kept layer p: :math:`\\frac{1}{N}\\sum_t \\|\\hat h_t - h^*_t\\|_2` over the N real (unpadded) calibration
tokens; the relative shift divides each term by :math:`\\|h^*_t\\|_2`.

Fit (target as in ReplaceMe, arXiv 2505.02819 Eq. 4). With :math:`M` the down-projection output of layer p, :math:`X`
its output hidden state and :math:`Y = h^*`, folding :math:`W_{down} \\leftarrow T^\\top W_{down}` turns the layer output
into :math:`X - M + M T`; so :math:`T = \\arg\\min \\|M T - (Y - X + M)\\|^2 + \\alpha\\|T - I\\|^2`, solved by
:func:`gradmap.projection.solve_ridge` (``prior="identity"``) with
:math:`\\alpha = \\lambda\\,\\mathrm{mean}(\\mathrm{diag}(M^\\top M))`. Shrinking toward the identity (the no-op fold)
rather than toward 0 is our choice, not the paper's: with few calibration tokens relative to the hidden size, a
zero prior maps every direction the data does not excite to ~0, deleting the MLP output there.

Safety: λ is chosen by k-fold cross-validation over the calibration windows (``folds`` contiguous groups, default
``min(4, nsamples)``) among ``RIDGE_GRID`` (or fixed by the user), always against "no fold". For each candidate, ``T``
is fitted on all groups but one and the next-token loss is measured on the left-out group; the cross-validated loss
sums over the groups. "No fold" scores the loss of the unfolded model on all windows. A fold is kept only if some λ
has a lower cross-validated loss; then the final ``T`` is fitted on all windows with that λ. Otherwise the layer is
left bit-identical and the report says so. Every window feeds the shifts, the selection and the final fit.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter
from .data import Calibration
from .prefix import PrefixCache, StopForward, forward_until_stop, resumed_loss_sum
from .projection import gram_accumulate_, solve_ridge

logger = logging.getLogger(__name__)

MODES = ("none", "max-shift", "every-gap")
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: Positions at the start of every calibration window left out of the Gram statistics. A window cut from the middle of
#: a text begins an artificial sequence; its first token is the attention sink (Xiao et al., arXiv 2309.17453) and
#: carries outlier activations (Sun et al., arXiv 2402.17762), and short windows over-represent it (1/64 of the tokens
#: of a 64-token window, 1/1024 in 1024-token use). Measured on SmolLM2 (8×64 calibration, Gromov block 11–18 removed,
#: test PPL at 1024 tokens): with it in the fit the cross-validated calibration loss fell 7.52 → 6.88 nats while test
#: PPL rose 169 → 770; without it (1 or 4 positions skipped) the cross-validation refused the fold (169 kept); on
#: GradMAP's selection the fold helped either way (57.3 → 51.8 / 51.9 / 52.0). Our choice, not the paper's.
SKIP_FIRST = 1


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`; else raise ``ValueError`` naming them."""
    if mode not in MODES:
        raise ValueError(f"compensate: {mode!r} is not one of {', '.join(MODES)}")
    return mode


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


def _capture(model: nn.Module, adapter: Adapter, ids, mask, outputs: dict[int, None], down_of: int | None = None,
             stop_after: int | None = None) -> dict:
    """Run ``model`` once (no grad) and return the outputs of layers ``outputs`` (current positions) and, if
    ``down_of`` is given, the down-projection output of that layer under key ``"down"``. The forward stops after
    layer ``stop_after`` (default: the deepest requested layer), so no logits are computed."""
    layers = adapter.layers(model)
    if stop_after is None:
        stop_after = max(outputs)
    got: dict = {}
    handles = []

    def out_hook(i):
        def hook(module, args, output):
            got[i] = (output[0] if isinstance(output, tuple) else output).detach()
            if i == stop_after:
                raise StopForward
        return hook

    for i in set(outputs) | {stop_after}:
        handles.append(layers[i].register_forward_hook(out_hook(i)))
    if down_of is not None:
        handles.append(adapter.down_proj(layers[down_of]).register_forward_hook(
            lambda m, a, o: got.__setitem__("down", o.detach())))
    try:
        forward_until_stop(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return got


def mean_shifts(dense: nn.Module, pruned: nn.Module, kept: list[int], calibration: Calibration, *,
                micro_batch: int = 8, keep_targets: dict[int, list] | None = None) -> tuple[list[float], list[float]]:
    """Mean and relative mean shift of every kept layer's output against its aligned dense hidden state.

    Args:
        keep_targets: optional ``{position: []}``; the aligned dense hidden states of those kept positions are
            appended per micro-batch (``[batch, seqlen, hidden]``, model dtype, CPU), so that :func:`fit_projection`
            can reuse them instead of running the dense model again.

    Returns:
        ``(shift, relative_shift)``: lists of floats, one per kept layer (position order), in hidden-state units.
    """
    da, pa = get_adapter(dense), get_adapter(pruned)
    n_dense = len(da.layers(dense))
    aligned = [aligned_dense_layer(kept, p, n_dense) for p in range(len(kept))]
    abs_sum = torch.zeros(len(kept), dtype=torch.float64)
    rel_sum = torch.zeros(len(kept), dtype=torch.float64)
    tokens = 0
    for ids, mask in calibration.batches(micro_batch):
        real = mask.bool().flatten()
        d_out = _capture(dense, da, ids, mask, dict.fromkeys(aligned))
        p_out = _capture(pruned, pa, ids, mask, dict.fromkeys(range(len(kept))))
        for p, store in (keep_targets or {}).items():
            store.append(d_out[aligned[p]].cpu())
        for p in range(len(kept)):
            target = d_out[aligned[p]].flatten(0, 1)[real.to(d_out[aligned[p]].device)].double()
            diff = p_out[p].flatten(0, 1)[real.to(p_out[p].device)].double() - target
            dist = diff.norm(dim=-1)
            abs_sum[p] += dist.sum().cpu()
            rel_sum[p] += (dist / target.norm(dim=-1).clamp_min(1e-12)).sum().cpu()
        tokens += int(real.sum())
    return (abs_sum / tokens).tolist(), (rel_sum / tokens).tolist()


def heldout_loss(model: nn.Module, calibration: Calibration, micro_batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on ``calibration`` (no grad)."""
    total, count = _loss_sum(model, calibration, micro_batch)
    return total / max(count, 1)


def fit_projection(dense: nn.Module, pruned: nn.Module, kept: list[int], position: int, calibration: Calibration, *,
                   micro_batch: int = 8, dense_targets: list[torch.Tensor] | None = None,
                   skip_first: int = SKIP_FIRST) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stream the Gram statistics for kept layer ``position``: ``G = MᵀM`` and ``C = Mᵀ(Y − X + M)`` in fp64.

    For families with a normalisation after the MLP (Gemma2/3 sandwich norm, :mod:`gradmap.adapters`), the target
    ``Y − X + M`` is replaced by the pre-norm target ``rms(M) · (Y − X + N(M)) ⊘ g`` (derivation in
    :mod:`gradmap.adapters`); ``M`` is still the ``down_proj`` output.

    ``dense_targets``, when given, holds the aligned dense hidden states per micro-batch (from :func:`mean_shifts`
    with ``keep_targets``); otherwise the dense model is run up to the aligned layer for every micro-batch.

    ``skip_first``: the first positions of every window left out of ``G`` and ``C`` (:data:`SKIP_FIRST`); they still
    run through the model as context.

    Returns:
        ``(G, C, tokens)``: fp64 ``[d, d]`` tensors on the model's device and the number of tokens used.

    Raises:
        ValueError: ``skip_first`` < 0.
    """
    if skip_first < 0:
        raise ValueError(f"skip_first: must be >= 0, got {skip_first}")
    da, pa = get_adapter(dense), get_adapter(pruned)
    n_dense = len(da.layers(dense))
    aligned = aligned_dense_layer(kept, position, n_dense)
    layer = pa.layers(pruned)[position]
    d = pa.mlp_out_features(layer)
    norm = pa.post_mlp_norm(layer)
    device = next(pruned.parameters()).device
    gain_inv = None
    if norm is not None:
        # RMSNorm gain g: N(c·1) = g for a large constant vector (rms = c, eps negligible).
        with torch.no_grad():
            gain = norm(torch.full((1, d), 1e3, dtype=next(pruned.parameters()).dtype, device=device)).double()[0]
        gain_inv = torch.where(gain.abs() > 1e-6, 1.0 / gain, torch.zeros_like(gain))
    G = torch.zeros(d, d, dtype=torch.float64, device=device)
    C = torch.zeros(d, d, dtype=torch.float64, device=device)
    tokens = 0
    for b, (ids, mask) in enumerate(calibration.batches(micro_batch)):
        used = mask.clone()
        used[:, :skip_first] = 0
        real = used.bool().flatten().to(device)
        y = dense_targets[b] if dense_targets is not None else _capture(dense, da, ids, mask, {aligned: None})[aligned]
        got = _capture(pruned, pa, ids, mask, {position: None}, down_of=position)
        m = got["down"].reshape(-1, d)[real]  # OPT's fc2 sees [batch * seqlen, ffn] already flattened
        x = got[position].flatten(0, 1)[real]
        y = y.flatten(0, 1)[real.to(y.device)].to(device)
        if norm is None:
            target = y.double() - x.double() + m.double()
        else:  # sandwich norm: pre-norm target Z = rms(M) · (Y − X + N(M)) ⊘ g (module docstring of adapters)
            with torch.no_grad():
                nm = norm(m).double()
            rms = m.double().square().mean(-1, keepdim=True).sqrt()
            target = rms * (y.double() - x.double() + nm) * gain_inv
        gram_accumulate_(G, C, m, target)
        tokens += int(real.sum())
    return G, C, tokens


def fit_projection_folds(dense: nn.Module, pruned: nn.Module, kept: list[int], position: int,
                         folds: list[Calibration], *, micro_batch: int = 8,
                         dense_targets: list[list[torch.Tensor]] | None = None
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """:func:`fit_projection` on each group of ``folds`` separately: the per-fold statistics of cross-validation.

    ``G = Σ_k G_k`` and ``C = Σ_k C_k`` are the statistics of all windows; ``G − G_k``, ``C − C_k`` those of every
    group but ``k``. Micro-batches never straddle two groups. ``dense_targets``, when given, holds for each group the
    aligned dense states per micro-batch of that group (as :func:`fit_projection` takes them).

    Returns:
        ``(Gs, Cs, tokens)``: lists of fp64 ``[d, d]`` tensors (one per group, on the model's device; memory
        ``2 · len(folds) · d² · 8`` bytes) and the number of real tokens over all groups.
    """
    Gs, Cs, tokens = [], [], 0
    for k, part in enumerate(folds):
        G, C, n = fit_projection(dense, pruned, kept, position, part, micro_batch=micro_batch,
                                 dense_targets=None if dense_targets is None else dense_targets[k])
        Gs.append(G)
        Cs.append(C)
        tokens += n
    return Gs, Cs, tokens


def _loss_sum(model: nn.Module, calibration: Calibration, micro_batch: int) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) of ``model`` on ``calibration`` and the number of predicted tokens."""
    return resumed_loss_sum(model, calibration, None, 0, micro_batch)[:2]


MAX_CONDITION = 1e10


def conditioned_ridge(G: torch.Tensor, ridge: float, max_condition: float = MAX_CONDITION
                      ) -> tuple[float | None, float]:
    """Smallest ridge ``λ' ≥ ridge`` (``ridge`` times powers of 10, from 1e-8 when ``ridge`` is 0) for which
    ``G + λ'·mean(diag(G))·I`` has a 2-norm condition number at most ``max_condition``.

    A near-singular Gram matrix (collinear down-projection outputs, e.g. few calibration tokens or a dead MLP) makes
    the unregularised solve amplify noise into a garbage ``T``; raising λ bounds that amplification. The condition
    number comes from the eigenvalues of the symmetric ``G`` (fp64), so raising the ridge costs no extra solve.

    Args:
        G: ``[d, d]`` symmetric PSD Gram matrix.
        ridge: requested relative ridge (≥ 0).

    Returns:
        ``(λ', condition number at λ')``; ``(None, inf)`` if ``G`` is zero or non-finite (nothing to fit).
    """
    G64 = G.double()
    if not torch.isfinite(G64).all():
        return None, float("inf")
    eig = torch.linalg.eigvalsh(G64).clamp_min(0.0)
    scale = float(torch.diagonal(G64).mean())
    if scale <= 0:
        return None, float("inf")
    lam = float(ridge)
    for _ in range(40):
        alpha = lam * scale
        cond = float((eig.max() + alpha) / (eig.min() + alpha)) if float(eig.min()) + alpha > 0 else float("inf")
        if cond <= max_condition:
            return lam, cond
        lam = lam * 10 if lam > 0 else 1e-8
    return None, float("inf")


@dataclass
class LayerFit:
    """Outcome of compensating one kept layer (original index ``layer``).

    The loss fields keep their historical names but hold cross-validated losses (mean next-token cross-entropy,
    nats/token, over all calibration windows; :func:`compensate`): ``heldout_loss_before`` is the loss of the model
    without this fold (earlier folds applied), ``heldout_loss_after`` the cross-validated loss of the chosen λ (equal
    to ``heldout_loss_before`` when the fold is skipped), and ``candidates`` maps ``"none"`` and each tried λ
    (formatted ``:g``, after any conditioning raise) to its cross-validated loss (NaN: the solve failed). ``ridge`` is
    the λ of the applied fold (``None`` if skipped) and ``tokens`` the real tokens that fed the final fit.
    """

    layer: int
    position: int
    aligned_dense_layer: int
    ridge: float | None
    heldout_loss_before: float
    heldout_loss_after: float
    candidates: dict[str, float]
    applied: bool
    tokens: int
    seconds: float
    note: str = ""


@dataclass
class CompensationResult:
    """Stage-2 report: shifts of every kept layer (original index → value), the fits, and the time (seconds)."""

    mode: str
    shifts: dict[int, float] = field(default_factory=dict)
    relative_shifts: dict[int, float] = field(default_factory=dict)
    fits: list[LayerFit] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


DEFAULT_FOLDS = 4


def _check_folds(folds, nsamples: int) -> int:
    """``folds`` resolved (``None`` → ``min(DEFAULT_FOLDS, nsamples)``) and validated against ``nsamples``."""
    if folds is None:
        folds = min(DEFAULT_FOLDS, nsamples)
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= nsamples:
        raise ValueError(f"folds: need an int with 2 <= folds <= nsamples={nsamples}, got {folds!r}")
    return folds


def compensate(dense: nn.Module, pruned: nn.Module, kept: list[int], calibration: Calibration, *,
               mode: str = "every-gap", ridge: float | None = None, folds: int | None = None,
               micro_batch: int = 8, dense_cache_bytes: int = 2 << 30, progress: bool = False) -> CompensationResult:
    """Run stage 2 on ``pruned`` IN PLACE (``dense`` is only read).

    For each layer to compensate: per-group Gram statistics (:func:`fit_projection_folds`); for each λ candidate and
    each group ``k``, ``T_k = solve_ridge(G − G_k, C − C_k, λ, prior="identity")`` is folded in, the summed
    next-token loss on group ``k`` is added up, and the weights are restored exactly; the cross-validated loss is the
    total over the predicted tokens of all windows. The λ with the lowest loss wins against "no fold" (loss of the
    unfolded model on all windows); if it wins, ``solve_ridge(G, C, λ, prior="identity")`` on all windows is folded.
    Module docstring: alignment, target, safety.

    Args:
        dense: the unpruned model (same weights as before pruning).
        pruned: the pruned working model; its down projections are updated.
        kept: original index of each layer of ``pruned``.
        calibration: calibration windows, split into ``folds`` contiguous groups (:meth:`Calibration.folds`); all
            of them feed the shifts, the cross-validation and the final fit.
        mode: ``"none"``, ``"max-shift"`` (only the kept layer with the largest mean shift) or ``"every-gap"`` (the
            kept layer before each removed block, shallow to deep, each fit seeing the earlier folds).
        ridge: relative ridge λ; ``None`` chooses from :data:`RIDGE_GRID` by cross-validation. A fixed λ is still
            cross-validated against "no fold".
        folds: number of cross-validation groups, an int with ``2 <= folds <= nsamples`` (default
            ``min(4, nsamples)``). Each λ candidate costs one forward pass over all windows.
        dense_cache_bytes: if the aligned dense hidden states of every layer to compensate fit in this many bytes
            (CPU memory), they are kept from the mean-shift pass and the dense model runs once in total; otherwise the
            dense model is re-run (streamed) for each fit, so memory never grows with the number of tokens.

    Returns:
        :class:`CompensationResult`; its :class:`LayerFit` losses are cross-validated losses.

    Raises:
        ValueError: unknown mode, negative/NaN ridge, fewer than 2 calibration windows when compensating, a bad
            ``folds``, or a Gram matrix with NaN/inf (fp16 overflow). An ill-conditioned Gram matrix is not an error:
            the ridge is raised (:func:`conditioned_ridge`, on the statistics of all windows) and the raise is
            reported in ``notes``.
    """
    check_mode(mode)
    if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge: must be a finite number >= 0, got {ridge}")
    start = time.perf_counter()
    result = CompensationResult(mode=mode)
    if mode == "none":
        return result
    if calibration.nsamples < 2:
        raise ValueError("calibration: stage 2 needs at least 2 windows (cross-validation holds one out); "
                         "raise nsamples")
    parts = calibration.folds(_check_folds(folds, calibration.nsamples))
    n_dense = len(get_adapter(dense).layers(dense))
    gaps = gap_positions(kept, n_dense)
    # The every-gap targets are known before the shifts: keep their dense states from the shift pass if they fit.
    # Micro-batches are taken group by group everywhere, so the cached states line up with every later pass.
    hidden = pruned.config.hidden_size
    itemsize = next(dense.parameters()).element_size()
    cache_need = calibration.input_ids.numel() * hidden * itemsize * len(gaps)
    cache = mode == "every-gap" and cache_need <= dense_cache_bytes
    targets: dict[int, list[list[torch.Tensor]]] | None = {p: [] for p in gaps} if cache else None
    abs_sum = [0.0] * len(kept)
    rel_sum = [0.0] * len(kept)
    for part in parts:
        keep = {p: [] for p in gaps} if cache else None
        shifts, rel = mean_shifts(dense, pruned, kept, part, micro_batch=micro_batch, keep_targets=keep)
        for p in range(len(kept)):  # per-group means back to sums: the overall mean over all real tokens
            abs_sum[p] += shifts[p] * part.num_tokens
            rel_sum[p] += rel[p] * part.num_tokens
        for p, store in (keep or {}).items():
            targets[p].append(store)
    shifts = [v / calibration.num_tokens for v in abs_sum]
    result.shifts = dict(zip(kept, shifts))
    result.relative_shifts = dict(zip(kept, [v / calibration.num_tokens for v in rel_sum]))
    if mode == "max-shift":
        positions = [max(range(len(kept)), key=lambda p: shifts[p])]
    else:
        positions = gaps
        if kept[0] != 0:
            result.notes.append(f"layers 0..{kept[0] - 1} removed at the start: no kept layer before them to fold into")
    adapter = get_adapter(pruned)

    def cv_total(fold_sums) -> float:
        total, count = map(sum, zip(*fold_sums))
        return total / max(count, 1)

    base_loss = None
    for position in tqdm(positions, desc="compensating", disable=not progress, leave=False):
        t0 = time.perf_counter()
        if base_loss is None:  # the model without this fold (earlier folds applied), on all windows
            base_loss = cv_total([_loss_sum(pruned, part, micro_batch) for part in parts])
        Gs, Cs, tokens = fit_projection_folds(dense, pruned, kept, position, parts, micro_batch=micro_batch,
                                              dense_targets=targets.pop(position) if targets else None)
        G, C = Gs[0].clone(), Cs[0].clone()
        for Gk, Ck in zip(Gs[1:], Cs[1:]):
            G += Gk
            C += Ck
        if not (torch.isfinite(G).all() and torch.isfinite(C).all()):
            raise ValueError(f"stage 2: the Gram matrix of layer {kept[position]} holds NaN/inf: the activations "
                             "overflowed (float16?); rerun with dtype bfloat16 or float32, or compensate 'none'")
        layer = adapter.layers(pruned)[position]
        down = adapter.down_proj(layer)
        # a fold into this layer changes nothing before it: every CV forward resumes from its cached input
        resume = [PrefixCache(pruned, part, micro_batch=micro_batch, positions=[position], adapter=adapter)
                  for part in parts]
        original_w = down.weight.detach().clone()
        original_b = down.bias.detach().clone() if down.bias is not None else None

        def restore():
            with torch.no_grad():
                down.weight.copy_(original_w)
                if original_b is not None:
                    down.bias.copy_(original_b)

        candidates: dict[str, float] = {"none": base_loss}
        best: tuple[str, float, float | None] = ("none", base_loss, None)
        raised: list[str] = []
        # a zeroed down_proj (BlockPruner's removed MLP, a dead MLP) gives M = 0: no fold can change the output
        silent = float(torch.diagonal(G).sum()) == 0.0
        for requested in () if silent else ((ridge,) if ridge is not None else RIDGE_GRID):
            lam, cond = conditioned_ridge(G, requested)
            if lam is None:
                raised.append(f"ridge {requested:g}: no ridge up to 1e32 conditions it (zero or non-finite); skipped")
                candidates[f"{requested:g}"] = float("nan")
                continue
            if lam != requested:
                raised.append(f"ridge {requested:g} raised to {lam:g} (Gram matrix condition number {cond:.3g})")
            key = f"{lam:g}"
            if key in candidates:  # two requested ridges raised to the same λ: scored once
                continue
            fold_sums = []
            for k, part in enumerate(parts):
                try:
                    T = solve_ridge(G - Gs[k], C - Cs[k], lam, prior="identity")
                except torch.linalg.LinAlgError:
                    break
                if not torch.isfinite(T).all():
                    break
                adapter.fold_into_mlp_out_(layer, T)
                try:
                    fold_sums.append(resumed_loss_sum(pruned, part, resume[k], start=position)[:2])
                finally:
                    restore()
            if len(fold_sums) < len(parts):
                candidates[key] = float("nan")
                continue
            loss = cv_total(fold_sums)
            candidates[key] = loss
            if loss < best[1]:
                best = (key, loss, lam)
        del Gs, Cs, resume
        note = ""
        for r in raised:
            result.notes.append(f"layer {kept[position]}: ill-conditioned Gram matrix: {r}")
            logger.warning("stage 2: layer %d: ill-conditioned Gram matrix: %s", kept[position], r)
        T = None
        if best[2] is not None:
            try:
                T = solve_ridge(G, C, best[2], prior="identity")
            except torch.linalg.LinAlgError:
                T = None
            if T is not None and not torch.isfinite(T).all():
                T = None
            if T is None:
                note = f"ridge {best[0]}: the solve on all windows failed: fold skipped, layer left unchanged"
        elif silent:
            note = "the down_proj output is zero on every calibration token (MLP removed or dead): nothing to fold into"
        else:
            note = "no ridge lowered the cross-validated loss: fold skipped, layer left unchanged"
        applied = T is not None
        if applied:
            adapter.fold_into_mlp_out_(layer, T)
        else:
            result.notes.append(f"layer {kept[position]}: {note}")
        fit = LayerFit(layer=kept[position], position=position,
                       aligned_dense_layer=aligned_dense_layer(kept, position, n_dense),
                       ridge=best[2] if applied else None, heldout_loss_before=base_loss,
                       heldout_loss_after=best[1] if applied else base_loss, candidates=candidates, applied=applied,
                       tokens=tokens, seconds=time.perf_counter() - t0, note=note)
        result.fits.append(fit)
        logger.info("stage 2: layer %d -> cross-validated loss %.4f -> %.4f (ridge %s)%s", fit.layer, base_loss,
                    fit.heldout_loss_after, best[0] if applied else "none", "" if applied else " [skipped]")
        if applied:
            base_loss = None  # the next layer's "no fold" baseline includes this fold: measured again
    result.seconds = time.perf_counter() - start
    return result
