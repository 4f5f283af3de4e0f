"""Loader for the native stage-2 ops (``csrc/``): ``torch.ops.gradmap.fold_projection_`` and ``gram_accumulate_``.

At import this module loads ``gradmap/_C*.so`` (schemas, CPU and Meta kernels) and, if built, ``gradmap/_C_cuda*.so``
(CUDA kernels), both produced by ``setup.py``. If the CPU library is absent or was built against another torch, it
warns once and :mod:`gradmap.projection` keeps using its PyTorch reference implementations. Setting the environment
variable ``GRADMAP_DISABLE_EXT=1`` skips loading on purpose (no warning).

The ops (GradMAP arXiv 2602.14649 Sec. 3; closed form as in ReplaceMe arXiv 2505.02819 Eq. 4):

* ``fold_projection_(weight, T)``: ``weight ← Tᵀ·weight`` in place; weight ``[out, in]`` fp32/fp16/bf16/fp64 with any
  strides, T ``[out, out]`` fp32/fp64; accumulation in T's dtype; written back in the weight's dtype.
* ``gram_accumulate_(G, C, X, Y)``: ``G += XᵀX``, ``C += XᵀY``; X ``[tokens, d]``, Y ``[tokens, e]``
  fp32/fp16/bf16/fp64; G/C fp64 or fp32; fp64 accumulation on CPU, G's dtype on CUDA.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_loaded: dict[str, bool] = {"cpu": False, "cuda": False}
_load_error: str | None = None


def _library(stem: str) -> str | None:
    found = sorted(glob.glob(os.path.join(_HERE, f"{stem}.*.so")) + glob.glob(os.path.join(_HERE, f"{stem}.so")))
    return found[0] if found else None


def _load() -> None:
    global _load_error
    if os.environ.get("GRADMAP_DISABLE_EXT", "0") not in ("", "0"):
        _load_error = "disabled by GRADMAP_DISABLE_EXT"
        return
    path = _library("_C")
    if path is None:
        _load_error = "not built (gradmap/_C*.so missing)"
    else:
        try:
            torch.ops.load_library(path)
            torch.ops.gradmap.fold_projection_.default  # noqa: B018 (schema present = compatible build)
            torch.ops.gradmap.gram_accumulate_.default  # noqa: B018
            _loaded["cpu"] = True
        except (OSError, RuntimeError, AttributeError) as exc:  # built for another torch / missing symbols
            _load_error = f"{path} failed to load: {exc}"
    if not _loaded["cpu"]:
        warnings.warn(f"gradmap: native ops unavailable ({_load_error}); using the PyTorch reference path. "
                      "Build them with `pip install --no-build-isolation --use-pep517 -e .` (see README).", RuntimeWarning,
                      stacklevel=3)
        return
    cuda_path = _library("_C_cuda")
    if cuda_path is not None:
        try:
            torch.ops.load_library(cuda_path)
            _loaded["cuda"] = True
        except (OSError, RuntimeError) as exc:
            warnings.warn(f"gradmap: CUDA ops in {cuda_path} failed to load ({exc}); CUDA tensors use the PyTorch "
                          "reference path.", RuntimeWarning, stacklevel=3)


_load()


def backend(device: str | torch.device = "cpu") -> str:
    """Report which implementation stage 2 uses for tensors on ``device``.

    Args:
        device: a device or device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns:
        ``"cpp"`` (C++ CPU kernels), ``"cuda"`` (CUDA kernels) or ``"reference"`` (PyTorch code in
        :mod:`gradmap.projection`; the native library is not built, failed to load, or has no kernel for this device).
    """
    kind = torch.device(device).type
    if kind == "cpu" and _loaded["cpu"]:
        return "cpp"
    if kind == "cuda" and _loaded["cuda"]:
        return "cuda"
    return "reference"


def unavailable_reason() -> str | None:
    """Why the native CPU library is not in use (``None`` when it is loaded)."""
    return None if _loaded["cpu"] else _load_error
