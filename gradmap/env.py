"""What gradmap runs on: versions, GPUs, and which implementation each device gets (``gradmap env``).

:func:`environment_report` collects, without loading a model:

* versions of Python, gradmap, torch (and the CUDA / cuDNN it was built with), Triton, transformers, accelerate,
  safetensors, lm_eval;
* the GPUs torch sees (name, compute capability, memory in bytes);
* per device (``cpu`` and each ``cuda:<i>``): the stage-2 ops backend (:func:`gradmap.ops.backend`: ``cpp``,
  ``cuda`` or ``reference``) and the path of the fused weight-gradient reduction (:mod:`gradmap.kernels`):
  ``triton (compiled)``, ``triton (interpreter)`` or ``torch fallback`` (what ``backend="auto"`` resolves to for fp32
  inputs);
* where the native library was loaded from (prebuilt file or just-in-time build), or why it was not.

:func:`format_report` renders it as the text ``gradmap env`` prints; ``gradmap env --json`` prints the dict.
"""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from . import __version__, ops
from .kernels.grad_reduce import resolve_backend, triton_interpreting

PACKAGES = ("gradmap", "torch", "triton", "transformers", "accelerate", "safetensors", "tokenizers", "numpy",
            "lm_eval", "ninja")


def _version(name: str) -> str | None:
    if name == "gradmap":
        return __version__  # the imported package (a source checkout may differ from the installed metadata)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _triton_path(device: torch.device) -> str:
    """The fused-reduction path ``backend="auto"`` takes for fp32 tensors on ``device`` (see :mod:`gradmap.kernels`)."""
    try:
        chosen = resolve_backend(None, device, torch.float32)
    except (ValueError, RuntimeError) as exc:  # e.g. a bad $GRADMAP_GRAD_REDUCE
        return f"error: {exc}"
    if chosen == "torch":
        return "torch fallback"
    return "triton (interpreter)" if triton_interpreting() else "triton (compiled)"


def environment_report() -> dict:
    """Versions, GPUs and the per-device implementation choices of this process.

    Loads the native ops library if it was not loaded yet (possibly compiling it on first use, see
    :mod:`gradmap.ops`). Never raises for a missing package or GPU: missing versions are ``None``.

    Returns:
        ``{"python": str, "platform": str, "versions": {package: str | None}, "torch_cuda": str | None,
        "cudnn": int | None, "cuda_available": bool, "gpus": [{"index", "name", "capability", "memory_bytes"}],
        "devices": {device: {"ops_backend": str, "grad_reduce": str}}, "cuda_kernels_registered": bool,
        "native_library": gradmap.ops.library_info(), "torch_threads": int}``.
    """
    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_bytes": int(props.total_memory)})
    devices = ["cpu"] + [f"cuda:{g['index']}" for g in gpus]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "gpus": gpus,
        "devices": {d: {"ops_backend": ops.backend(d), "grad_reduce": _triton_path(torch.device(d))}
                    for d in devices},
        "cuda_kernels_registered": ops.backend("cuda") == "cuda",
        "native_library": ops.library_info(),
        "torch_threads": torch.get_num_threads(),
    }


def format_report(report: dict) -> str:
    """Plain-text rendering of :func:`environment_report` (one fact per line), for bug reports."""
    v = report["versions"]
    lines = [f"gradmap {v['gradmap']}   python {report['python']}   {report['platform']}",
             "versions: " + ", ".join(f"{k} {v[k] or '-'}" for k in PACKAGES if k != "gradmap"),
             f"torch built with CUDA {report['torch_cuda'] or '-'}; CUDA available: "
             f"{'yes' if report['cuda_available'] else 'no'}; CPU threads {report['torch_threads']}"]
    for g in report["gpus"]:
        lines.append(f"gpu {g['index']}: {g['name']} (sm {g['capability']}, {g['memory_bytes'] / 2**30:.1f} GiB)")
    if not report["gpus"]:
        lines.append("gpu: none visible")
    lines.append("device    stage-2 ops   fused grad reduction")
    for d, row in report["devices"].items():
        lines.append(f"{d:9s} {row['ops_backend']:13s} {row['grad_reduce']}")
    lib = report["native_library"]
    if lib["path"]:
        lines.append(f"native library ({lib['source']}): {lib['path']}; CUDA kernels registered: "
                     f"{'yes' if report['cuda_kernels_registered'] else 'no'}")
    else:
        lines.append(f"native library: none ({lib['error']})")
    for reason in lib["rejected"] if lib["path"] else []:
        lines.append(f"  passed over: {reason}")
    lines.append(f"GRADMAP_EXT mode: {lib['mode']}")
    return "\n".join(lines)
