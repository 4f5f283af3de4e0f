"""Stage-2 fit: the ridge, its conditioning, the fold as engine overrides, and the records of what was done.

Solve (:func:`gradmap.projection.solve_ridge`, ``prior="identity"``): :math:`T = \\arg\\min \\|M T - Z\\|^2 +
\\alpha\\|T - I\\|^2` with :math:`\\alpha = \\lambda\\,\\mathrm{mean}(\\mathrm{diag}(M^\\top M))`. Shrinking toward the
identity (the no-op fold) rather than toward 0 is our choice, not the paper's (GradMAP arXiv 2602.14649 does not
specify the regulariser): with few calibration tokens relative to the hidden size, a zero prior maps every direction
the data does not excite to ~0, deleting the MLP output there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine import Engine, View

MAX_CONDITION = 1e10


@dataclass
class Spectrum:
    """Eigenvalues (fp64, ascending, clamped at 0) and mean diagonal of a symmetric PSD Gram matrix, computed ONCE
    per compensated layer and shared by every ridge value (:func:`conditioned_ridge`)."""

    eigenvalues: torch.Tensor
    scale: float

    @classmethod
    def of(cls, G: torch.Tensor) -> "Spectrum | None":
        """The spectrum of ``G`` ``[d, d]``; ``None`` if ``G`` is zero or non-finite (nothing to fit)."""
        G64 = G.double()
        if not torch.isfinite(G64).all():
            return None
        scale = float(torch.diagonal(G64).mean())
        if scale <= 0:
            return None
        return cls(torch.linalg.eigvalsh(G64).clamp_min(0.0), scale)


def conditioned_ridge(spectrum: Spectrum | None, ridge: float, max_condition: float = MAX_CONDITION
                      ) -> tuple[float | None, float]:
    """Smallest ridge ``λ' ≥ ridge`` (``ridge`` times powers of 10, from 1e-8 when ``ridge`` is 0) for which
    ``G + λ'·mean(diag(G))·I`` has a 2-norm condition number at most ``max_condition``.

    A near-singular Gram matrix (collinear down-projection outputs, e.g. few calibration tokens or a dead MLP) makes
    the unregularised solve amplify noise into a garbage ``T``; raising λ bounds that amplification. The condition
    number comes from the eigenvalues of ``G`` (:class:`Spectrum`, computed once per layer), so trying a ridge costs
    no extra eigendecomposition and no extra solve.

    Returns:
        ``(λ', condition number at λ')``; ``(None, inf)`` if ``spectrum`` is ``None`` (zero or non-finite ``G``).
    """
    if spectrum is None:
        return None, float("inf")
    eig, scale = spectrum.eigenvalues, spectrum.scale
    lam = float(ridge)
    for _ in range(40):
        alpha = lam * scale
        low = float(eig.min()) + alpha
        cond = float((eig.max() + alpha) / low) if low > 0 else float("inf")
        if cond <= max_condition:
            return lam, cond
        lam = lam * 10 if lam > 0 else 1e-8
    return None, float("inf")


def current_mlp_out(engine: Engine, view: View, orig: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer ``orig``'s ``down_proj`` weight and bias AS THE VIEW RUNS THEM (an override if there is one, e.g. an
    earlier fold or BlockPruner's zeroed projection; else the source tensor in its source dtype)."""
    adapter = engine.adapter
    w_name, b_name = adapter.mlp_out_names()
    overrides = view.overrides.get(orig, {})
    prefix = adapter.layer_prefix(orig)
    weight = overrides.get(w_name)
    if weight is None:
        weight = engine.weights.read(prefix + w_name)
    bias = overrides.get(b_name)
    if bias is None and (prefix + b_name) in engine.weights.names_all:
        bias = engine.weights.read(prefix + b_name)
    return weight, bias


def fold_overrides(engine: Engine, view: View, orig: int, T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Overrides of layer ``orig`` with ``T`` folded into its ``down_proj`` as the view runs it
    (:meth:`gradmap.adapters.Adapter.folded_mlp_out`), computed on the compute device in the source dtype and kept
    where the layer's weights live (device if resident, else host)."""
    weight, bias = current_mlp_out(engine, view, orig)
    device = engine.device
    new_w, new_b = engine.adapter.folded_mlp_out(weight.to(device), None if bias is None else bias.to(device),
                                                 T.to(device))
    home = device if engine.weights.placement[orig] == "device" else torch.device("cpu")
    w_name, b_name = engine.adapter.mlp_out_names()
    out = {w_name: new_w.to(home)}
    if new_b is not None:
        out[b_name] = new_b.to(home)
    return out


@dataclass
class LayerFit:
    """Outcome of compensating one kept layer (original index ``layer``).

    ``loss_before`` is the mean next-token cross-entropy (nats/token, all calibration windows) of the model without
    this fold (earlier folds applied); ``loss_after`` the cross-validated loss of the chosen λ (equal to
    ``loss_before`` when the fold is skipped), and ``candidates`` maps ``"none"`` and each VERIFIED λ (formatted
    ``:g``, after any conditioning raise) to its cross-validated loss (NaN: the solve failed); ``reconstruction``
    maps ``"none"`` and every λ searched to its cross-validated reconstruction error (:mod:`.cross_validation`).
    ``ridge`` is the λ of the applied fold (``None`` if skipped), ``tokens`` the real tokens that fed the final fit,
    ``seconds`` the wall time. ReplaceMe's fits hold no losses (``None``: nothing is held out).
    """

    layer: int
    position: int
    aligned_dense_layer: int
    ridge: float | None
    loss_before: float | None
    loss_after: float | None
    candidates: dict[str, float]
    applied: bool
    tokens: int
    seconds: float
    note: str = ""
    reconstruction: dict[str, float] = field(default_factory=dict)
    steps: int | None = None


@dataclass
class CompensationResult:
    """Stage-2 report: shifts of every kept layer (original index → value), the fits, the time (seconds) and the
    forward-equivalent passes it cost."""

    mode: str
    fit: str = "ridge"
    shifts: dict[int, float] = field(default_factory=dict)
    relative_shifts: dict[int, float] = field(default_factory=dict)
    fits: list[LayerFit] = field(default_factory=list)
    seconds: float = 0.0
    passes: float = 0.0
    notes: list[str] = field(default_factory=list)
