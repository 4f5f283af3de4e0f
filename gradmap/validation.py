"""Checks of user input that run before any long work (model load, scoring, compensation).

Every check raises ``ValueError`` (or ``FileNotFoundError`` for missing paths) whose message starts with the name of
the offending argument (``--ratio``-style on the command line, keyword name in the API) and states the accepted
values. :func:`check_prune_plan` checks a whole ``prune`` run against a model's ``config.json`` only, so a bad target,
protected list or sequence length is reported in well under a second, before gigabytes of weights are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import adapter_for_type
from .names import check_compensation


def resolve_target(num_layers_total: int, num_layers: int | None = None, ratio: float | None = None,
                   protected: list[int] | tuple[int, ...] = ()) -> int:
    """Number of decoder layers to remove, from exactly one of ``num_layers`` or ``ratio``.

    ``ratio`` is rounded half up: ``floor(ratio * L + 0.5)`` (30 layers at 0.25 → 8).

    Raises:
        ValueError: if both or neither are given; ``num_layers`` not in [1, L-1]; ``ratio`` not in (0, 1) or rounding
            to 0 or L; a protected index out of range; or too few unprotected layers to reach the target.
    """
    if (num_layers is None) == (ratio is None):
        raise ValueError("num_layers: give exactly one of num_layers or ratio")
    if ratio is not None:
        if not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"ratio: must be in (0, 1), got {ratio}")
        target = math.floor(float(ratio) * num_layers_total + 0.5)
        if not 1 <= target < num_layers_total:
            raise ValueError(f"ratio: {ratio} of {num_layers_total} layers rounds to {target} layers; "
                             f"need between 1 and {num_layers_total - 1}")
    else:
        target = int(num_layers)
        if not 1 <= target < num_layers_total:
            raise ValueError(f"num_layers: must be between 1 and {num_layers_total - 1} for a model with "
                             f"{num_layers_total} decoder layers, got {num_layers}")
    bad = [p for p in protected if not 0 <= int(p) < num_layers_total]
    if bad:
        raise ValueError(f"protected: indices {bad} out of range [0, {num_layers_total - 1}]")
    free = num_layers_total - len(set(int(p) for p in protected))
    if target > free:
        raise ValueError(f"protected: {num_layers_total - free} protected layers leave {free} removable, "
                         f"fewer than the target {target}")
    return target

def check_ridge(ridge: float | None, name: str = "ridge") -> None:
    """Accept ``None`` (chosen by cross-validation) or a finite number >= 0.

    Raises:
        ValueError: for a negative, NaN or infinite ridge.
    """
    if ridge is not None and not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"{name}: must be a finite number >= 0 (or unset: chosen by cross-validation), got {ridge}")


def check_positive(value: int, name: str, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if value is None or int(value) < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def check_threads(threads: int | None, name: str = "--threads") -> None:
    """Accept ``None`` (torch's choice) or a thread count >= 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"{name}: must be >= 1 (or unset for torch's choice), got {threads}")


def check_device(device: str | torch.device, name: str = "--device") -> torch.device:
    """Parse ``device`` and check that it exists on this machine.

    Returns:
        The ``torch.device``.

    Raises:
        ValueError: for an unknown device string, or a CUDA/MPS device this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: {device!r} is not a torch device; accepted: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r} requested but CUDA is not available here "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name}: {device!r} requested but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: device type {dev.type!r} is not supported; accepted: cpu, cuda, cuda:N, mps")
    return dev


@dataclass(frozen=True)
class ModelLimits:
    """What :func:`check_prune_plan` needs from a model config: family, decoder layers, longest sequence (tokens)."""

    model_type: str
    num_layers: int
    max_length: int | None

    @classmethod
    def from_config(cls, config) -> "ModelLimits":
        """Read ``model_type``, ``num_hidden_layers`` and ``max_position_embeddings`` (text config for multimodal)."""
        text = getattr(config, "text_config", None) or config
        return cls(getattr(config, "model_type", None), int(getattr(text, "num_hidden_layers")),
                   getattr(text, "max_position_embeddings", None))


def check_prune_plan(limits: ModelLimits, *, num_layers: int | None = None, ratio: float | None = None,
                     protected=(), seqlen: int | None = None, nsamples: int | None = None, compensate: str = "none",
                     ridge: float | None = None, micro_batch: int = 8, eval_seqlen: int | None = None,
                     names: dict[str, str] | None = None) -> int:
    """Check every argument of a ``prune`` run against the model's config before any work; return the target.

    Args:
        limits: the model's family, decoder-layer count and maximum sequence length (:class:`ModelLimits`).
        seqlen / nsamples: calibration window length (tokens) and count, when known.
        eval_seqlen: perplexity window length (tokens), when evaluating.
        names: argument name used in messages per keyword (CLI: ``{"seqlen": "--seqlen", ...}``).

    Returns:
        The number of decoder layers to remove.

    Raises:
        ValueError: unsupported family; target/ratio/protected out of range (:func:`gradmap.pruning.resolve_target`);
            ``seqlen`` or ``eval_seqlen`` < 2 or above the model's maximum; ``nsamples`` < 1, or < 2 with
            compensation (one window is held out); a bad ridge or micro-batch; unknown compensation mode.
    """
    n = names or {}
    adapter_for_type(limits.model_type)
    check_compensation(compensate)
    check_ridge(ridge, n.get("ridge", "ridge"))
    check_positive(micro_batch, n.get("micro_batch", "micro_batch"))
    target = resolve_target(limits.num_layers, num_layers, ratio, protected)
    for key, value in (("seqlen", seqlen), ("eval_seqlen", eval_seqlen)):
        if value is None:
            continue
        check_positive(value, n.get(key, key), minimum=2)
        if limits.max_length is not None and value > limits.max_length:
            raise ValueError(f"{n.get(key, key)}: {value} exceeds the model's maximum sequence length "
                             f"{limits.max_length}")
    if nsamples is not None:
        check_positive(nsamples, n.get("nsamples", "nsamples"))
        if compensate != "none" and nsamples < 2:
            raise ValueError(f"{n.get('nsamples', 'nsamples')}: stage 2 (compensate={compensate!r}) needs at least 2 "
                             f"calibration windows (one is held out), got {nsamples}; raise it or use compensate 'none'")
    return target
