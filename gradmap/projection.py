"""Closed-form projection for stage 2: streamed Gram matrices, the ridge solve, and the fold into ``down_proj``.

:func:`gram_accumulate_` and :func:`fold_projection_` run the native ops ``torch.ops.gradmap.*``
(``csrc/``, loaded by :mod:`gradmap.ops`) when they are built for the tensors' device and dtypes, and
otherwise the PyTorch references :func:`gram_accumulate_reference` and :func:`fold_projection_reference` (always
callable by name, for tests and benchmarks). :func:`gradmap.ops.backend` reports which one is active.

Problem (GradMAP stage 2, arXiv 2602.14649 Sec. 3; closed form as in ReplaceMe, arXiv 2505.02819 Eq. 4): find
:math:`T \\in \\mathbb{R}^{d\\times d}` minimising :math:`\\|M T - R\\|_F^2 + \\alpha \\|T\\|_F^2`, where the rows of
:math:`M` are the down-projection outputs of the compensated layer and the rows of :math:`R` the targets, over all
calibration tokens. The minimiser is :math:`T = (M^\\top M + \\alpha I)^{-1} M^\\top R`, computed from the Gram matrix
:math:`G = M^\\top M` and the cross term :math:`C = M^\\top R`, accumulated in fp64 one micro-batch at a time (memory
independent of the token count). Stage 2 (:func:`gradmap.compensation.compensate`) instead penalises
:math:`\\alpha \\|T - I\\|_F^2` (``solve_ridge(..., prior="identity")``), shrinking toward the no-op fold; that is our
choice, not the paper's.
"""

from __future__ import annotations

import torch

from . import ops

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_gram(G: torch.Tensor, C: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> None:

    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X, Y: need [tokens, d] and [tokens, e], got {tuple(X.shape)} and {tuple(Y.shape)}")
    if G.shape != (X.shape[1], X.shape[1]) or C.shape != (X.shape[1], Y.shape[1]):
        raise ValueError(f"G, C: need [{X.shape[1]}, {X.shape[1]}] and [{X.shape[1]}, {Y.shape[1]}], "
                         f"got {tuple(G.shape)} and {tuple(C.shape)}")


def gram_accumulate_(G: torch.Tensor, C: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> None:
    """In place: ``G += XᵀX`` and ``C += XᵀY`` (the streamed Gram statistics of the ridge fit, module docstring).

    Accumulation rule, the same on every device and on both paths: products and sums in fp64 whatever ``G``'s dtype;
    an fp32 ``G``/``C`` receives the call's fp64 increment rounded once. Runs ``torch.ops.gradmap.gram_accumulate_``
    (CPU: MKL/OpenBLAS GEMMs; CUDA: cuBLAS GEMMs; both stream fp64 token panels) when the native ops are loaded for
    this device and ``G``/``C`` are fp64/fp32 and ``X``/``Y`` fp32/fp16/bf16/fp64; otherwise
    :func:`gram_accumulate_reference`.

    Args:
        G: ``[d, d]`` fp64/fp32 accumulator.
        C: ``[d, e]`` accumulator of the same dtype as ``G``.
        X: ``[tokens, d]`` activations (fp32/fp16/bf16/fp64).
        Y: ``[tokens, e]`` targets.

    Raises:
        ValueError: on mismatched shapes, or (native op) if ``G``/``C`` share memory with each other or ``X``/``Y``.
    """
    _check_gram(G, C, X, Y)
    if (ops.backend(G.device) != "reference" and G.dtype == C.dtype and G.dtype in (torch.float64, torch.float32)
            and X.dtype in _ACTIVATION_DTYPES and Y.dtype in _ACTIVATION_DTYPES):
        torch.ops.gradmap.gram_accumulate_(G, C, X, Y)
        return
    gram_accumulate_reference(G, C, X, Y)


def gram_accumulate_reference(G: torch.Tensor, C: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> None:
    """PyTorch reference of :func:`gram_accumulate_`: ``G += XᵀX``, ``C += XᵀY`` with ``X`` and ``Y`` converted whole
    to fp64 (``tokens·(d + e)·8`` bytes) and one fp64 GEMM each; for fp32 ``G``/``C`` the fp64 increment is rounded
    once (the op's accumulation rule).

    Shapes as in :func:`gram_accumulate_`. Raises ValueError on mismatched shapes.
    """
    _check_gram(G, C, X, Y)
    X64 = X.to(torch.float64)
    if G.dtype == torch.float64:
        G.addmm_(X64.T, X64)
        C.addmm_(X64.T, Y.to(torch.float64))
    else:
        G.add_(X64.T @ X64)
        C.add_(X64.T @ Y.to(torch.float64))


PRIORS = ("zero", "identity")


def solve_ridge(G: torch.Tensor, C: torch.Tensor, ridge: float, *, prior: str = "zero",
                overwrite: bool = False) -> torch.Tensor:
    """Ridge solve from the Gram statistics, with the ridge relative to the mean Gram diagonal.

    With ``α = ridge · mean(diag(G))``:

    - ``prior="zero"`` (default): ``T = argmin ‖M T − R‖² + α‖T‖²``, i.e. ``(G + αI) T = C``. This is ReplaceMe's
      Eq. 4 (arXiv 2505.02819), used by :mod:`gradmap.methods.replaceme`.
    - ``prior="identity"``: ``T = argmin ‖M T − R‖² + α‖T − I‖²``, i.e. ``(G + αI) T = C + αI``. ``T`` shrinks toward
      the identity, the no-op fold, instead of toward 0: a direction that the calibration data does not excite keeps
      its MLP output rather than being deleted. As ``α → ∞``, ``T → I``; with no data (``G = 0``, so ``C = 0`` too)
      and ``ridge > 0``, ``T = I`` exactly. This prior is our choice for GradMAP's stage 2
      (:func:`gradmap.compensation.compensate`), not taken from the GradMAP paper (arXiv 2602.14649), which does
      not specify the regulariser. With ``ridge = 0`` the prior has no effect.

    Args:
        G: ``[d, d]`` symmetric PSD Gram matrix ``MᵀM`` (any float dtype; solved in fp64).
        C: ``[d, e]`` cross term ``MᵀR``; ``[d, d]`` for ``prior="identity"``.
        ridge: relative ridge strength λ ≥ 0.
        prior: ``"zero"`` or ``"identity"`` (keyword only).
        overwrite: fp64 ``G`` and ``C`` may be overwritten (the ridge is added to their diagonals in place), which
            saves two ``d × d`` fp64 copies; pass it for temporaries only. Beside ``G`` and ``C`` the solve then holds
            two more ``d × d`` fp64 matrices (the Cholesky factor and ``T``).

    Returns:
        ``T``: ``[d, e]`` fp64, on ``G``'s device.

    Raises:
        ValueError: if ``G`` or ``C`` holds NaN/inf (overflowed activations), ``ridge`` < 0, ``prior`` is not one of
            :data:`PRIORS`, or ``prior="identity"`` with ``C`` not ``[d, d]``.
        torch.linalg.LinAlgError: if ``G + αI`` is singular (use a larger ridge).
    """
    if prior not in PRIORS:
        raise ValueError(f"prior: {prior!r} is not one of {', '.join(repr(p) for p in PRIORS)}")
    if ridge < 0:
        raise ValueError(f"ridge: must be >= 0, got {ridge}")
    if prior == "identity" and (C.dim() != 2 or C.shape[0] != C.shape[1] or C.shape[0] != G.shape[0]):
        raise ValueError(f"C: prior='identity' needs a square [{G.shape[0]}, {G.shape[0]}] cross term, "
                         f"got {tuple(C.shape)}")
    if not (torch.isfinite(G).all() and torch.isfinite(C).all()):
        raise ValueError("Gram matrix holds NaN/inf: activations overflowed (use bfloat16 or float32, not float16)")
    A = G.double() if overwrite or G.dtype != torch.float64 else G.clone()
    scale = float(torch.diagonal(A).mean())
    alpha = ridge * scale
    if prior == "identity":
        if ridge > 0 and scale <= 0:  # no data: the prior alone decides (the relative α would be 0)
            return torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        C64 = C.double() if overwrite or C.dtype != torch.float64 else C.clone()
        C64.diagonal().add_(alpha)  # C + αI
    else:
        C64 = C.double()
    A.diagonal().add_(alpha)  # G + αI
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(C64, L)
    return torch.linalg.solve(A, C64)


def _check_fold(weight: torch.Tensor, T: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: need a 2-D [out, in] matrix, got {tuple(weight.shape)}")
    if T.dim() != 2 or T.shape[0] != T.shape[1] or T.shape[0] != weight.shape[0]:
        raise ValueError(f"T: need [{weight.shape[0]}, {weight.shape[0]}] for weight {tuple(weight.shape)}, "
                         f"got {tuple(T.shape)}")


def fold_projection_(weight: torch.Tensor, T: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Fold ``T`` into a linear layer in place: ``W ← Tᵀ W`` (and ``b ← Tᵀ b``), so ``y T = x (TᵀW)ᵀ + Tᵀ b``.

    nn.Linear convention ``y = x Wᵀ + b`` with ``W: [out, in]``; ``T: [out, out]`` (GradMAP arXiv 2602.14649 Sec. 3:
    the projection is reparameterised into ``down_proj``). ``weight`` may be any strided view (e.g. ``conv1d.weight.T``
    for GPT-2's transposed Conv1D): the result is written into the same storage, in the weight's dtype.

    Runs ``torch.ops.gradmap.fold_projection_`` (accumulation in ``T``'s dtype on every device: fp64 for fp64 ``T``,
    IEEE fp32 for fp32 ``T``, never TF32) when the native ops are loaded for this device and ``T`` is fp32/fp64 and the
    weight fp32/fp16/bf16/fp64 (``T`` is moved to the weight's device first); otherwise
    :func:`fold_projection_reference` (fp64). The bias is folded as a ``[out, 1]`` matrix through the same path.

    Raises:
        ValueError: if the shapes do not match, or (native op) if ``weight`` overlaps ``T`` or itself.
    """
    _check_fold(weight, T)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: need [{weight.shape[0]}], got {tuple(bias.shape)}")
    T = T.to(device=weight.device)
    with torch.no_grad():
        for target in (weight, None if bias is None else bias.unsqueeze(1)):
            if target is None:
                continue
            if (ops.backend(target.device) != "reference" and T.dtype in (torch.float32, torch.float64)
                    and target.dtype in _ACTIVATION_DTYPES):
                torch.ops.gradmap.fold_projection_(target, T)
            else:
                fold_projection_reference(target, T)


def fold_projection_reference(weight: torch.Tensor, T: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """PyTorch reference of :func:`fold_projection_`: ``W ← Tᵀ W`` (and ``b ← Tᵀ b``) computed in fp64.

    Written back in the weight's dtype into the same storage. Raises ValueError if the shapes do not match.
    """
    _check_fold(weight, T)
    with torch.no_grad():
        T64 = T.to(device=weight.device, dtype=torch.float64)
        weight.copy_((T64.T @ weight.double()).to(weight.dtype))
        if bias is not None:
            bias.copy_((T64.T @ bias.double()).to(bias.dtype))
