"""Which implementation an op runs: the one place that decides (``model.kernels``).

Every op with a fused kernel takes ``impl`` in ``auto | triton | ref`` and asks :func:`choose_impl`:

* ``auto`` (``model.kernels=auto``): the kernel for CUDA tensors when triton imports and the op
  supports the shape; the PyTorch reference otherwise, **including CPU tensors under
  ``TRITON_INTERPRET=1``** (the interpreter is a test tool, not a CPU backend: a CPU training run
  stays on the references whether or not the variable is set);
* ``triton``: the kernel, or an error saying why it cannot run (tests use it to run kernels in
  the interpreter);
* ``ref`` (``model.kernels=ref``): the reference.

The LCS op has no ``impl``: its compiled extension is exact (bit-identical to the reference) and
also the CPU fast path, so it runs whenever it was built (``carft_mega.ops.lcs``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

IMPLS = ("auto", "triton", "ref")
_warned: set[str] = set()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_impl(op: str, impl: str, device: torch.device, *, unsupported: str | None = None) -> str:
    """Resolve ``impl`` for tensors on ``device``; returns ``"triton"`` or ``"ref"``.

    Args:
        op: the op's name, for messages (e.g. ``"cot_head"``).
        impl: ``auto``, ``triton`` or ``ref``.
        device: where the op's inputs live.
        unsupported: why the kernel cannot take these inputs (e.g. ``"d=130 > 128"``), or None.

    Raises:
        ValueError: an unknown ``impl``, or ``triton`` for inputs the kernel does not support.
        RuntimeError: ``triton`` on CPU tensors without ``TRITON_INTERPRET=1``, or without triton.
    """
    if impl not in IMPLS:
        raise ValueError(f"carft_mega.ops.{op}: impl={impl!r}, expected one of {IMPLS} (config field 'model.kernels')")
    if impl == "ref":
        return "ref"
    if impl == "triton":
        if unsupported is not None:
            raise ValueError(f"carft_mega.ops.{op}: the Triton kernel does not support these inputs: {unsupported}")
        if not triton_available():
            raise RuntimeError(f"carft_mega.ops.{op}: impl='triton' but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"carft_mega.ops.{op}: impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                               "before triton is first imported")
        return "triton"
    if device.type != "cuda" or unsupported is not None:
        return "ref"
    if not triton_available():
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"carft_mega.ops.{op}: triton is not installed; CUDA tensors use the PyTorch reference",
                          RuntimeWarning, stacklevel=3)
        return "ref"
    return "triton"
