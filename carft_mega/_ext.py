"""The compiled extension `carft_mega_ext` (kernels/cuda/), or None when it was not built."""

try:
    import carft_mega_ext as _C
except ImportError:  # pure-Python install: ops fall back to their PyTorch references
    _C = None

__all__ = ["_C"]
