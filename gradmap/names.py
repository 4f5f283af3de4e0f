"""The names a user can choose from (methods, metrics, compensation modes, backends) and the defaults.

This module imports nothing from gradmap: validation, the CLI and the API read these lists before anything heavy is
imported or loaded. Each name is implemented where the table says.

=================  ==========================================================================
name list          implemented in
=================  ==========================================================================
:data:`METHODS`    :mod:`gradmap.methods` (GradMAP in :mod:`gradmap.methods.gradmap`, baselines beside it)
:data:`METRICS`    :mod:`gradmap.methods.metrics` (GradMAP stage-1 metrics)
:data:`COMPENSATIONS`  :mod:`gradmap.compensation`
:data:`BACKENDS`   weight-gradient reduction of the weight metrics (:mod:`gradmap.kernels.fused_scoring`)
=================  ==========================================================================
"""

from __future__ import annotations

METHODS = ("gradmap", "shortgpt", "gromov", "taylor-plus", "ppl", "sleb", "blockpruner")
WEIGHT_METRICS = ("grad_l1", "grad_l2", "taylor")
HIDDEN_METRICS = ("taylor_hidden", "grad_update_norm")
METRICS = WEIGHT_METRICS + ("gate",) + HIDDEN_METRICS
STAGE2_MODES = ("none", "max-shift", "every-gap", "trained")
COMPENSATIONS = STAGE2_MODES + ("replaceme",)
BACKENDS = ("hooks", "fused")
FITS = ("ridge", "trained")

DEFAULT_METHOD = "gradmap"
DEFAULT_METRIC = "grad_update_norm"
DEFAULT_COMPENSATION = "every-gap"


def _check(value: str, accepted: tuple[str, ...], name: str) -> str:
    if value not in accepted:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(accepted)}")
    return value


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`; else raise ``ValueError`` naming them."""
    return _check(method, METHODS, "method")


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is one of :data:`METRICS`; else raise ``ValueError`` naming them."""
    return _check(metric, METRICS, "metric")


def check_compensation(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`COMPENSATIONS`; else raise ``ValueError`` naming them."""
    return _check(mode, COMPENSATIONS, "compensate")


def check_fit(fit: str) -> str:
    """Return ``fit`` if it is one of :data:`FITS`; else raise ``ValueError`` naming them."""
    return _check(fit, FITS, "fit")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`; else raise ``ValueError`` naming them."""
    return _check(backend, BACKENDS, "backend")
