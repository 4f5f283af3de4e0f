"""Checks of user input that run before any long work (model load, scoring, compensation).

Every check raises ``ValueError`` (or ``FileNotFoundError`` for missing paths) whose message starts with the name of
the offending argument (``--ratio``-style on the command line, keyword name in the API) and states the accepted
values. :func:`check_prune_plan` checks a whole ``prune`` run against a model's ``config.json`` only, so a bad target,
protected list or sequence length is reported in well under a second, before gigabytes of weights are read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import adapter_for_type
from .pruning import resolve_target

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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


def check_model_dir(path: str | os.PathLike) -> None:
    """Check that a local directory holds a complete, unquantized Hugging Face causal-LM checkpoint.

    Raises:
        FileNotFoundError: no ``config.json``, no weight file (a config-only directory), or no tokenizer files.
        ValueError: unreadable ``config.json``, a ``quantization_config`` in it, or a GGUF file instead of weights
            (dequantize it first).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {str(path)!r} holds no config.json; it is not a Hugging Face model directory")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: {str(path / 'config.json')!r} is not valid JSON: {exc}") from None
    if isinstance(raw, dict) and raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) \
            else "?"
        raise ValueError(f"model: {str(path)!r} is quantized (quant_method {method!r}); gradmap needs a dequantized "
                         "float model (load it dequantized and save_pretrained it plainly first)")
    gguf = sorted(p.name for p in path.glob("*.gguf"))
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        if gguf:
            raise ValueError(f"model: {str(path)!r} holds a GGUF file ({gguf[0]}) and no safetensors/bin weights; "
                             "dequantize it first: AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., "
                             "quantization_config=GgufConfig(dequantize=True)) then save_pretrained")
        raise FileNotFoundError(f"model: {str(path)!r} holds a config.json but no weights "
                                f"(none of {', '.join(WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"model: {str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the tokenizer into the model directory (tokenizer.save_pretrained(dir))")


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
    from .methods import check_compensation

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
