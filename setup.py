"""gradmap: GradMAP layer pruning for causal LLMs.

Install with ``pip install --no-build-isolation -e .`` (an isolated build environment would pull a different torch).
torch is not pinned here: bring your own build, or ``pip install torch==2.13.0`` for the CPU wheel.

Native ops (``csrc/``, loaded by :mod:`gradmap.ops`), built with torch.utils.cpp_extension + ninja:

* ``gradmap._C`` (schemas, CPU and Meta kernels): always, unless ``GRADMAP_BUILD_EXT=0``.
* ``gradmap._C_cuda`` (CUDA kernels): when ``GRADMAP_BUILD_CUDA`` is ``auto`` (default) and the installed torch is a
  CUDA build (``torch.version.cuda``) and a CUDA toolkit is found (``cpp_extension.CUDA_HOME``); ``GRADMAP_BUILD_CUDA=1``
  makes a missing toolkit an error, ``GRADMAP_BUILD_CUDA=0`` skips it. Without a visible GPU, ``TORCH_CUDA_ARCH_LIST``
  defaults to ``8.0;9.0`` (cpp_extension cannot guess it then).

Without a compiler (or with ``GRADMAP_BUILD_EXT=0``) gradmap still works through its PyTorch reference path.
"""

import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _switch(name: str, default: str, accepted: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in accepted:
        raise SystemExit(f"{name}={value!r}: accepted values are {', '.join(accepted)}")
    return value


def _extensions():
    """Return (ext_modules, cmdclass) for the native ops, honouring GRADMAP_BUILD_EXT / GRADMAP_BUILD_CUDA."""
    if _switch("GRADMAP_BUILD_EXT", "1", ("0", "1")) == "0":
        print("gradmap: GRADMAP_BUILD_EXT=0, skipping the C++/CUDA ops (the PyTorch reference path is used)")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx = ["-O3", "-std=c++20"]
    csrc = os.path.join("csrc")
    ext = [cpp_extension.CppExtension(
        "gradmap._C",
        sources=[os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "cpu", "ops_cpu.cpp")],
        extra_compile_args={"cxx": cxx})]
    cuda = _switch("GRADMAP_BUILD_CUDA", "auto", ("auto", "0", "1"))
    have_toolkit = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if cuda == "1" and not have_toolkit:
        raise SystemExit(f"GRADMAP_BUILD_CUDA=1 but the CUDA ops cannot be built: torch.version.cuda="
                         f"{torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r} (needs a CUDA build of torch "
                         f"and a CUDA toolkit; set CUDA_HOME)")
    if cuda != "0" and have_toolkit:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext.append(cpp_extension.CUDAExtension(
            "gradmap._C_cuda", sources=[os.path.join(csrc, "cuda", "ops_cuda.cu")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]}))
    else:
        print(f"gradmap: building the CPU ops only (GRADMAP_BUILD_CUDA={cuda}, torch.version.cuda="
              f"{torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r})", file=sys.stderr)
    return ext, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="gradmap",
    version="0.1.0",
    description="GradMAP: faster layer pruning with a gradient metric and projection compensation",
    packages=find_packages(include=["gradmap", "gradmap.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5",
        "accelerate",
        "safetensors",
        "tqdm",
        "numpy",
        "matplotlib",
        "mwparserfromhell",
        "gguf",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["gradmap=gradmap.cli:main"]},
)
