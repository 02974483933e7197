"""The compiled extension `carft_mega_cuda` (kernels/cuda/), or None when it was not built.

Entry points (see kernels/cuda/lcs/lcs.cpp): ``lcs_masks_cpu(a, a_len, b, b_len)``; when built with
its CUDA part (``with_cuda`` is True) also ``lcs_masks_cuda(a, a_len, b, b_len, stream)``. Use
them through ``carft_mega.ops``, which falls back to the PyTorch references when ``_C`` is None.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against by name)

_C_error: str | None = None  # why the import failed, for the ops' fallback warning
try:
    import carft_mega_cuda as _C
except ModuleNotFoundError:  # pure-Python install: ops fall back to their PyTorch references
    _C = None
    _C_error = "not built"
except ImportError as e:  # built, but does not load (e.g. against another torch): say so
    _C = None
    _C_error = f"built but failed to import ({e}); rebuild it"



def triton_kernels(name: str):
    """The Triton kernel module ``carft_mega._kernels.<name>`` (``kernels/triton/<name>.py``).

    setup.py installs ``kernels/triton`` as ``carft_mega._kernels``; in a source checkout that was
    not pip-installed the same directory is registered under that name here, so tests and benchmarks
    also run from the repository root. Importing a kernel imports triton: on a machine without a
    GPU set ``TRITON_INTERPRET=1`` before, or use the ops' PyTorch references.
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    full = f"carft_mega._kernels.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name not in ("carft_mega._kernels", full):
            raise  # triton itself (or another dependency) is missing
    src = Path(__file__).resolve().parents[1] / "kernels" / "triton"
    if not (src / f"{name}.py").is_file():
        raise ModuleNotFoundError(f"{full} is not installed and kernels/triton/ is not next to the package")
    spec = importlib.util.spec_from_file_location("carft_mega._kernels", src / "__init__.py",
                                                  submodule_search_locations=[str(src)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["carft_mega._kernels"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module(full)


__all__ = ["_C", "triton_kernels"]
