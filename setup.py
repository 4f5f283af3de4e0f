"""Build of gradmap's native ops; the package metadata is in pyproject.toml.

The ops (``csrc/``: schemas, Meta, CPU and CUDA kernels, plain C++ calling ATen) are compiled into one
library, ``gradmap._C``, with torch.utils.cpp_extension and ninja. It must be compiled against the torch it will run
with, so:

* torch importable at build time (``pip install --no-build-isolation .``, ``python3 setup.py build_ext --inplace``):
  the library is built. Against a CUDA build of torch the CUDA kernels reach CUDA tensors; no CUDA toolkit is needed
  (the kernels call ATen's cuBLAS GEMMs). ``gradmap/_C.build.json`` records the torch version it was built for.
* torch not importable (a plain ``pip install .``: pip's isolated build environment holds only setuptools and wheel,
  and pyproject.toml deliberately does not list torch there, which would pull a second, multi-GB torch): gradmap is
  installed without the library and compiles it on first use (gradmap/ops.py, ``torch.utils.cpp_extension.load``).

The sources travel with the package: ``build_py`` copies ``csrc/`` into the built package as ``gradmap/csrc/`` (an
sdist carries them through MANIFEST.in), so an installed gradmap without the library can still compile it.

``GRADMAP_BUILD_EXT``: ``auto`` (default) as above, and a failed compile (no C++ compiler) only warns; ``1`` makes a
missing torch or a failed compile an error; ``0`` builds nothing.
``MAX_JOBS`` limits ninja's parallel compile jobs.
"""

import glob
import json
import os
import platform
import sys
import time

import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_C.build.json"  # read by gradmap/ops.py: a library built for another torch is not loaded


def _switch(name: str, default: str, accepted: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in accepted:
        raise SystemExit(f"{name}={value!r}: accepted values are {', '.join(accepted)}")
    return value


def _extensions():
    """Return (ext_modules, cmdclass) for the native ops, honouring GRADMAP_BUILD_EXT."""
    mode = _switch("GRADMAP_BUILD_EXT", "auto", ("auto", "0", "1"))
    if mode == "0":
        print("gradmap: GRADMAP_BUILD_EXT=0, not building the native ops (compiled on first use, see gradmap/ops.py)",
              file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if mode == "1":
            raise SystemExit(f"GRADMAP_BUILD_EXT=1 but torch is not importable here ({exc}); build with "
                             "`pip install --no-build-isolation .` in an environment that has torch") from None
        print(f"gradmap: torch is not importable in this build environment ({exc}): installing without the native "
              "ops; they are compiled on first use (or build with `pip install --no-build-isolation .`)",
              file=sys.stderr)
        return [], {}

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"),
                                                                 recursive=True))
    # auto: a failed compile (e.g. no C++ compiler) is a warning, and gradmap installs without the library
    ext = cpp_extension.CppExtension("gradmap._C", sources=sources, extra_compile_args={"cxx": ["-O3", "-std=c++20"]},
                                     optional=mode == "auto")

    class BuildExtWithInfo(cpp_extension.BuildExtension):
        """BuildExtension that writes gradmap/_C.build.json (torch/CUDA/Python versions) next to a library it has
        just linked (an up-to-date library keeps its record; a failed optional build writes none)."""

        def run(self):
            started = time.time()
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 (compiler missing or failing: ninja, ABI check, linker)
                if not all(getattr(e, "optional", False) for e in self.extensions):
                    raise
                print(f"gradmap: compiling the native ops failed ({' '.join(str(exc).split())[:300]}); installing "
                      "without them: gradmap compiles them on first use, or runs on its PyTorch references",
                      file=sys.stderr)
                return
            for e in self.extensions:
                lib = self.get_ext_fullpath(e.name)
                if os.path.exists(lib) and os.path.getmtime(lib) >= started - 1:
                    with open(os.path.join(os.path.dirname(lib), BUILD_INFO), "w") as f:
                        json.dump({"torch": torch.__version__, "cuda": torch.version.cuda,
                                   "python": platform.python_version()}, f)

    print(f"gradmap: building the native ops against torch {torch.__version__} (CUDA {torch.version.cuda})",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtWithInfo.with_options(use_ninja=True)}


class BuildPyWithSources(build_py):
    """build_py that also puts the C++ sources (``csrc/``) into the built package as ``gradmap/csrc/``, for the
    first-use compile of an installation without the library (gradmap/ops.py)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(self.build_lib, "gradmap", "csrc"),
                            dirs_exist_ok=True)


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources

setup(ext_modules=ext_modules, cmdclass=cmdclass)
