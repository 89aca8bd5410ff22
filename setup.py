"""Build script: the Python package, plus the optional C++/CUDA extensions (see csrc/).

- `spguard._C`: the op schemas and the CPU kernels (built unless SPGUARD_NO_CPP=1).
- `spguard._C_cuda`: the CUDA kernels (built when torch has CUDA, nvcc is found and SPGUARD_NO_CUDA!=1).
A skipped or failed extension prints one line and leaves the package working on the torch path.
"""

import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
# AVX2 + FMA + F16C (x86-64-v3) covers every x86 server CPU of the last decade; without them the loops vectorise
# only to SSE2. (The cross-attention kernel adds an AVX-512 build of itself, chosen at run time.)
X86_VECTOR_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
# -fno-trapping-math lets GCC turn the kernels' selects (clamps, masks) into vector blends: they never
# rely on floating-point exceptions.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_80,code=sm_80"]


def _notice(message):
    print(f"spguard: {message}; the package will use the torch reference path", file=sys.stderr)


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _sources(*patterns):
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def _extensions():
    if _flag("SPGUARD_NO_CPP"):
        _notice("SPGUARD_NO_CPP=1, not building the C++/CUDA extensions")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # setup.py run outside the isolated build (pyproject requires torch)
        _notice(f"torch not importable ({exc}), not building the C++ extension")
        return [], {}
    cxx = CXX_FLAGS + (X86_VECTOR_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else [])
    extensions = [
        cpp_extension.CppExtension(
            "spguard._C",
            _sources("csrc/register.cpp", "csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _flag("SPGUARD_NO_CUDA"):
        _notice("SPGUARD_NO_CUDA=1, not building the CUDA extension")
    elif torch.version.cuda is None:
        _notice(f"torch {torch.__version__} has no CUDA, not building the CUDA extension")
    elif cpp_extension.CUDA_HOME is None:
        _notice("nvcc not found (set CUDA_HOME), not building the CUDA extension")
    else:
        extensions.append(
            cpp_extension.CUDAExtension(
                "spguard._C_cuda",
                _sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu"),
                extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
            )
        )

    class BuildExtension(cpp_extension.BuildExtension):
        """Builds each extension on its own; one that fails is reported in one line and skipped."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure must not fail the install
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                _notice(f"building {ext.name} failed ({first_line})")

    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["spguard", "spguard.models", "spguard.ops", "spguard.world", "spguard.kernels"],
    package_dir={"spguard": "spguard", "spguard.kernels": "kernels"},
    package_data={"spguard": ["models/shapes/*.json", "models/shapes/*/*"]},  # the embedded default model
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
