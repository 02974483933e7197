"""The compiled extension `carft_mega_ext` (kernels/cuda/), or None when it was not built.

Entry points (see kernels/cuda/lcs/lcs.cpp): ``lcs_masks_cpu(a, a_len, b, b_len)``; when built with
its CUDA part (``with_cuda`` is True) also ``lcs_masks_cuda(a, a_len, b, b_len, stream)``. Use
them through ``carft_mega.ops``, which falls back to the PyTorch references when ``_C`` is None.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against by name)

_C_error: str | None = None  # why the import failed, for the ops' fallback warning
try:
    import carft_mega_ext as _C
except ModuleNotFoundError:  # pure-Python install: ops fall back to their PyTorch references
    _C = None
    _C_error = "not built"
except ImportError as e:  # built, but does not load (e.g. against another torch): say so
    _C = None
    _C_error = f"built but failed to import ({e}); rebuild it"

__all__ = ["_C"]
