"""Loader of the native stage-2 ops ``torch.ops.gradmap.fold_projection_`` and ``gram_accumulate_``.

The ops live in one library compiled from ``csrc/`` (schemas, Meta, CPU and CUDA kernels; plain C++ that calls
ATen, no CUDA toolkit needed): the repository's top-level ``csrc/`` in a source checkout, its copy
``gradmap/csrc/`` inside an installed wheel (``setup.py`` copies it there). A usable prebuilt library is loaded when
this module is imported; otherwise
the first use (:func:`backend`, which :mod:`gradmap.projection` calls) tries the next source. The sources, in order:

1. ``gradmap/_C*.so``, built by ``setup.py`` when torch was importable at build time (``pip install
   --no-build-isolation .`` or ``python3 setup.py build_ext --inplace``), unless ``gradmap/_C.build.json`` says it was
   built for another torch version (its C++ ABI would not match);
2. a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler; about 20-100 s, once),
   cached under ``<cache>/torch_extensions/<python>-torch<version>/`` where ``<cache>`` is ``$GRADMAP_CACHE``, else
   ``$XDG_CACHE_HOME/gradmap`` or ``~/.cache/gradmap`` (the cache of :func:`gradmap.models.cache_dir`);
3. otherwise nothing: gradmap warns once (``RuntimeWarning``, no traceback) and :mod:`gradmap.projection` uses its
   PyTorch references.

``GRADMAP_EXT`` picks among these: ``auto`` (default, 1 → 2 → 3), ``prebuilt`` (1 → 3), ``jit`` (2 → 3) or ``off``
(3, without the warning); ``GRADMAP_DISABLE_EXT=1`` is the same as ``off``.

The ops (GradMAP arXiv 2602.14649 Sec. 3; closed form as in ReplaceMe arXiv 2505.02819 Eq. 4), with the same
accumulation dtype on every device:

* ``fold_projection_(weight, T)``: ``weight ← Tᵀ·weight`` in place; weight ``[out, in]`` fp32/fp16/bf16/fp64 with any
  strides, T ``[out, out]`` fp32/fp64; accumulation in T's dtype (on CUDA fp32 without TF32); written back in the
  weight's dtype.
* ``gram_accumulate_(G, C, X, Y)``: ``G += XᵀX``, ``C += XᵀY``; X ``[tokens, d]``, Y ``[tokens, e]``
  fp32/fp16/bf16/fp64; G/C fp64 or fp32; accumulation in fp64 whatever G's dtype (fp32 G/C receive each call's fp64
  increment rounded once).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import threading
import warnings

import torch

log = logging.getLogger(__name__)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: the C++ sources: the copy an installed wheel carries, else the source checkout's top-level csrc/
CSRC_DIR = next((d for d in (os.path.join(PACKAGE_DIR, "csrc"), os.path.join(os.path.dirname(PACKAGE_DIR), "csrc"))
                 if os.path.isdir(d)), os.path.join(PACKAGE_DIR, "csrc"))
BUILD_INFO = "_C.build.json"
"""Written by ``setup.py`` next to the library: the torch/CUDA/Python versions it was compiled against."""
CXX_FLAGS = ("-O3", "-std=c++20")
EXT_MODES = ("auto", "prebuilt", "jit", "off")
OPS = ("fold_projection_", "gram_accumulate_")
_DEVICE_KEYS = {"cpu": ("CPU", "cpp"), "cuda": ("CUDA", "cuda")}  # device type → (dispatch key, backend name)

_lock = threading.Lock()
_state: dict = {"tried": False, "prebuilt_tried": False, "path": None, "source": None, "error": None, "rejected": []}


def sources() -> list[str]:
    """The C++ sources of the library (``csrc/**/*.cpp``, sorted), as ``setup.py`` compiles them."""
    return sorted(glob.glob(os.path.join(CSRC_DIR, "**", "*.cpp"), recursive=True))


def cache_dir() -> str:
    """gradmap's cache directory: ``$GRADMAP_CACHE``, else ``$XDG_CACHE_HOME/gradmap`` or ``~/.cache/gradmap``."""
    env = os.environ.get("GRADMAP_CACHE")
    if env:
        return env
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "gradmap")


def jit_build_dir() -> str:
    """Where the just-in-time build goes: one directory per Python and torch version (their ABIs must match)."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}".replace("+", "_")
    return os.path.join(cache_dir(), "torch_extensions", tag)


def ext_mode() -> str:
    """The loading mode from ``$GRADMAP_EXT`` (``auto`` when unset) and ``$GRADMAP_DISABLE_EXT`` (module docstring).

    Raises:
        ValueError: ``$GRADMAP_EXT`` is not one of :data:`EXT_MODES`.
    """
    if os.environ.get("GRADMAP_DISABLE_EXT", "0").strip() not in ("", "0"):
        return "off"
    mode = os.environ.get("GRADMAP_EXT", "auto").strip().lower() or "auto"
    if mode not in EXT_MODES:
        raise ValueError(f"$GRADMAP_EXT: {mode!r} is not one of {', '.join(EXT_MODES)}")
    return mode


def _prebuilt_library() -> str | None:
    found = sorted(glob.glob(os.path.join(PACKAGE_DIR, "_C.*.so")) + glob.glob(os.path.join(PACKAGE_DIR, "_C.so")))
    return found[0] if found else None


def _abi_mismatch(path: str) -> str | None:
    """Why the prebuilt library at ``path`` must not be loaded into this process (None: it may)."""
    info_path = os.path.join(os.path.dirname(path), BUILD_INFO)
    try:
        with open(info_path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None  # built by an older setup.py: try it; a mismatch then shows as a load error
    except (OSError, ValueError) as exc:
        return f"{info_path} is unreadable ({exc})"
    if info.get("torch") != torch.__version__:
        return f"{path} was built for torch {info.get('torch')}, this is torch {torch.__version__}"
    return None


def _check_schemas() -> None:
    for name in OPS:
        getattr(torch.ops.gradmap, name).default  # noqa: B018 (AttributeError when the library lacks the op)


def _load_prebuilt() -> str:
    """Load ``gradmap/_C*.so``; return its path. Raises RuntimeError with the reason when it cannot be used."""
    path = _prebuilt_library()
    if path is None:
        raise RuntimeError("no prebuilt library (gradmap/_C*.so missing)")
    mismatch = _abi_mismatch(path)
    if mismatch:
        raise RuntimeError(mismatch)
    try:
        torch.ops.load_library(path)
        _check_schemas()
    except (OSError, RuntimeError, AttributeError) as exc:  # built for another torch / missing symbols
        raise RuntimeError(f"{path} failed to load: {' '.join(str(exc).split())[:300]}") from None
    return path


def _load_jit() -> str:
    """Compile (or reuse) the library with ``torch.utils.cpp_extension.load`` and load it; return its path."""
    from torch.utils import cpp_extension

    build_dir = jit_build_dir()
    os.makedirs(build_dir, exist_ok=True)
    log.info("gradmap: compiling the native ops into %s (first use with this torch; ~20-100 s)", build_dir)
    try:
        path = cpp_extension.load(name="gradmap_C", sources=sources(), extra_cflags=list(CXX_FLAGS),
                                  build_directory=build_dir, is_python_module=False, verbose=False)
        _check_schemas()
    except Exception as exc:  # noqa: BLE001 (compiler, ninja, linker or loader failure: all mean "no native ops")
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise RuntimeError(f"JIT build in {build_dir} failed: {(lines[-1] if lines else type(exc).__name__)[:300]}"
                           ) from None
    return path


def _ensure_loaded() -> bool:
    """Load the library once per process (module docstring); True when the ops are registered."""
    if _state["tried"]:
        return _state["path"] is not None
    with _lock:
        if _state["tried"]:
            return _state["path"] is not None
        reasons = list(_state["rejected"])  # the prebuilt library's, when the import-time attempt passed it over
        try:
            mode = ext_mode()
        except ValueError as exc:
            mode, reasons = "off", [str(exc)]
        if mode == "off" and not reasons:
            _state.update(tried=True, error="disabled by GRADMAP_EXT=off / GRADMAP_DISABLE_EXT=1")
            return False
        for source, loader in (("prebuilt", _load_prebuilt), ("jit", _load_jit)):
            if mode not in ("auto", source) or (source == "prebuilt" and _state["prebuilt_tried"]):
                continue
            try:
                _state.update(path=loader(), source=source)
                break
            except RuntimeError as exc:
                reasons.append(str(exc))
                if source == "prebuilt":
                    log.info("gradmap: %s", exc)
        _state.update(tried=True, error=None if _state["path"] else "; ".join(reasons), rejected=reasons)
        if _state["path"] is None:
            warnings.warn(f"gradmap: native ops unavailable ({_state['error']}); using the PyTorch reference path. "
                          "See README, 'Native ops'.", RuntimeWarning, stacklevel=3)
    return _state["path"] is not None


def _load_prebuilt_at_import() -> None:
    """At import, load a usable prebuilt library right away (cheap), so that ``torch.ops.gradmap.*`` exist as soon as
    this module is imported; anything else (a just-in-time build, the warning) waits for the first use."""
    try:
        mode = ext_mode()
    except ValueError:
        return  # reported on first use
    if mode not in ("auto", "prebuilt"):
        return
    with _lock:
        _state["prebuilt_tried"] = True
        try:
            _state.update(path=_load_prebuilt(), source="prebuilt", tried=True)
        except RuntimeError as exc:
            _state["rejected"] = [str(exc)]


def backend(device: str | torch.device = "cpu") -> str:
    """Which implementation stage 2 uses for tensors on ``device``; loads the library on the first call.

    Args:
        device: a device or device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns:
        ``"cpp"`` (C++ CPU kernels), ``"cuda"`` (CUDA kernels: cuBLAS GEMMs) or ``"reference"`` (PyTorch code in
        :mod:`gradmap.projection`: the library is disabled, could not be loaded or built, or has no kernel for this
        device type). ``"cuda"`` means the CUDA kernels are registered; whether this torch can make CUDA tensors is
        ``torch.cuda.is_available()``.
    """
    kind = torch.device(device).type
    if kind not in _DEVICE_KEYS or not _ensure_loaded():
        return "reference"
    key, name = _DEVICE_KEYS[kind]
    has = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"gradmap::{op}", key) for op in OPS)
    return name if has else "reference"


def unavailable_reason() -> str | None:
    """Why the native library is not in use (``None`` when it is loaded); loads it first if not tried yet."""
    _ensure_loaded()
    return _state["error"]


def library_info() -> dict:
    """Where the native library came from (loads it first if not tried yet).

    Returns:
        ``{"path": str | None, "source": "prebuilt" | "jit" | None, "error": str | None, "rejected": [str],
        "mode": str}``: the loaded file, how it was obtained, why there is none (``error``), why earlier candidates
        were passed over (``rejected``, e.g. a prebuilt library built for another torch), and ``$GRADMAP_EXT``'s mode.
    """
    _ensure_loaded()
    try:
        mode = ext_mode()
    except ValueError as exc:
        mode = str(exc)
    return {"path": _state["path"], "source": _state["source"], "error": _state["error"],
            "rejected": list(_state["rejected"]), "mode": mode}


_load_prebuilt_at_import()
