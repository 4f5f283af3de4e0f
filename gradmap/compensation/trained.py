"""The stage-2 projection TRAINED by an optimiser, as the GradMAP paper describes it, beside the closed-form ridge.

GradMAP (arXiv 2602.14649, Sec. 3, stage 2) corrects the mean shift of the kept layer that drifts most with a
trainable projection matrix, fitted on the calibration hidden states with a mean-squared-error loss and a
regulariser, then reparameterised into that layer's down projection. With :math:`M` the layer's ``down_proj`` output
and :math:`Z` its target (:mod:`.statistics`), over the :math:`N` real calibration tokens, the loss is

.. math:: J(T) = \\frac{1}{N}\\|M T - Z\\|_F^2 + \\frac{\\alpha}{N}\\|T - I\\|_F^2,
          \\qquad \\alpha = \\lambda\\,\\mathrm{mean}(\\mathrm{diag}(M^\\top M)),

the same objective as the closed-form stage 2 (:func:`gradmap.projection.solve_ridge` with ``prior="identity"``)
but minimised by Adam (Kingma & Ba, arXiv 1412.6980, Algorithm 1) for a fixed number of steps from :math:`T = I`.
The paper does not give its regulariser, optimiser settings or data batching; ours: the full-batch gradient
:math:`\\nabla J = \\frac{2}{N}\\big((G + \\alpha I)T - C - \\alpha I\\big)` is computed exactly from the streamed Gram
statistics :math:`G = M^\\top M`, :math:`C = M^\\top Z` (fp64; no token is held in memory, every step sees every
token), :data:`STEPS` steps at learning rate :data:`LEARNING_RATE` (Adam's step is in units of the entries of
:math:`T`, whatever the activation scale). Stopping after a few hundred steps regularises on top of the ridge (early
stopping): with many steps the result converges to the closed-form solution, which the tests use as the oracle.

Like the closed form, the trained fold is cross-validated by the next-token loss against "no fold" and applied only
when it lowers it (:mod:`.cross_validation`); the report records every step count scored.
"""

from __future__ import annotations

import math

import torch

#: Adam steps of the trained projection (the paper's "a few hundred").
STEPS = 300
#: Adam learning rate (units of the entries of T).
LEARNING_RATE = 1e-3
#: Relative ridge toward the identity in the trained objective (weak; early stopping does most of the regularising).
TRAINED_RIDGE = 1e-3
#: Checkpoints (step counts) scored by the cross-validated reconstruction error; the best is kept.
CHECKPOINTS = (25, 50, 100, 200, 300)


def train_projection(G: torch.Tensor, C: torch.Tensor, tokens: int, *, steps: int = STEPS,
                     lr: float = LEARNING_RATE, ridge: float = TRAINED_RIDGE,
                     checkpoints: tuple[int, ...] = ()) -> dict[int, torch.Tensor]:
    """Train ``T`` by full-batch Adam on :math:`J(T)` (module docstring) from the Gram statistics.

    Args:
        G: ``[d, d]`` Gram matrix ``MᵀM`` (any float dtype; the optimisation runs in fp64 on ``G``'s device).
        C: ``[d, d]`` cross term ``MᵀZ``.
        tokens: N, the calibration tokens that fed ``G`` and ``C`` (> 0).
        steps: Adam steps (≥ 1).
        lr: Adam learning rate (> 0).
        ridge: relative ridge λ ≥ 0 toward the identity.
        checkpoints: step counts (≤ ``steps``) whose ``T`` is also returned.

    Returns:
        ``{step count: T}`` for every checkpoint and ``steps`` itself; each ``T`` fp64 ``[d, d]``.

    Raises:
        ValueError: bad shapes, non-finite statistics, ``tokens`` ≤ 0, ``steps`` < 1, ``lr`` ≤ 0, ``ridge`` < 0, or a
            checkpoint outside ``[1, steps]``.
    """
    if G.dim() != 2 or G.shape[0] != G.shape[1] or C.shape != G.shape:
        raise ValueError(f"G, C: need two [d, d] matrices, got {tuple(G.shape)} and {tuple(C.shape)}")
    if not (torch.isfinite(G).all() and torch.isfinite(C).all()):
        raise ValueError("G, C: the Gram statistics hold NaN/inf (overflowed activations)")
    if tokens <= 0:
        raise ValueError(f"tokens: must be > 0, got {tokens}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: must be > 0, got {lr}")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge: must be >= 0, got {ridge}")
    if any(not 1 <= c <= steps for c in checkpoints):
        raise ValueError(f"checkpoints: need step counts in [1, {steps}], got {sorted(checkpoints)}")
    G64, C64 = G.double(), C.double()
    d = G64.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=G64.device)
    alpha = ridge * float(torch.diagonal(G64).mean().clamp_min(0.0))
    A = (G64 + alpha * eye) * (2.0 / tokens)  # ∇J = A T − B
    B = (C64 + alpha * eye) * (2.0 / tokens)
    T = eye.clone().requires_grad_(False)
    m = torch.zeros_like(T)
    v = torch.zeros_like(T)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # Adam's defaults (arXiv 1412.6980, Sec. 2)
    wanted = set(checkpoints) | {steps}
    out: dict[int, torch.Tensor] = {}
    for t in range(1, steps + 1):
        grad = A @ T - B
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        T = T - lr * m_hat / (v_hat.sqrt() + eps)
        if t in wanted:
            out[t] = T.clone()
    return out


def objective(G: torch.Tensor, C: torch.Tensor, z: float, tokens: int, T: torch.Tensor, ridge: float) -> float:
    """:math:`J(T)` (module docstring) from the Gram statistics and ``z = ‖Z‖²``: squared hidden-state units per
    token."""
    G64, C64, T64 = G.double(), C.double(), T.double()
    eye = torch.eye(G64.shape[0], dtype=torch.float64, device=G64.device)
    alpha = ridge * float(torch.diagonal(G64).mean().clamp_min(0.0))
    mse = float((G64 @ T64 * T64).sum() - 2 * (T64 * C64).sum() + z)
    return (mse + alpha * float(((T64 - eye) ** 2).sum())) / tokens
