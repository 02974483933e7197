"""CPU compatibility shim for megatron-core 0.16.1 (no GPU, gloo process groups).

megatron-core has no official CPU path: it calls ``torch.cuda.*`` and hard-codes
``device='cuda'`` in a handful of places. This module maps those calls onto the CPU so that
the same model, DDP, distributed optimizer, gradient clipping, dist_checkpointing and
KV-cache inference code runs in CI. The assumptions it covers are listed in
``../shared/notes/megatron_triton_on_cpu.md`` (file:line for 0.16.1); in short:

* ``torch.cuda.current_device()`` -> ``torch.device('cpu')`` (rotary tables, global memory
  buffer, TP mappings, DDP buffers allocate on it);
* the CUDA RNG API (``torch.cuda.manual_seed/get_rng_state/set_rng_state`` and Megatron's
  ``_get_cuda_rng_state/_set_cuda_rng_state``) -> the CPU generator, so
  ``model_parallel_cuda_manual_seed`` and the RNG tracker's ``fork()`` work;
* a global ``TorchFunctionMode`` that rewrites ``device='cuda'`` (str, ``torch.device`` or int)
  to the CPU, turns ``Tensor.cuda()`` / ``Tensor.to('cuda')`` into CPU no-ops, and reports
  ``Tensor.type()`` of CPU float tensors as ``torch.cuda.*`` (the optimizer and grad-clip code
  asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``);
* ``torch.cuda.Event`` / ``Stream`` / ``current_stream`` / ``synchronize`` stubs (the static
  inference controller times itself with CUDA events).

The mode costs a Python call on every torch function call made while it is active: measured
~15-18 ms per SmolLM2-135M forward on the 2-core CPU (25% of a one-token decode step at B=1,
10% at B=32; ``docs/benchmarks.md``). Only the optimizer, gradient clipping, schedules and
checkpointing code need its rewrites, so the model's forward runs without it:
:func:`suspended` (used by ``PolicyModel.trunk`` / ``lm_logits``) takes the mode off the stack
for the duration, and the one forward-path function that hard-codes ``device='cuda'``
(Megatron's default causal / sliding-window mask builders) is patched to build on the CPU.

The sequence-parallel RMSNorm is not patched here: ``carft_mega.models`` builds its own norm
module into the local layer spec, because a GPU box without Apex/TE needs it too.

``apply()`` is idempotent. It is called by ``carft_mega.parallel.init_distributed`` (and the
model builders) only when ``torch.cuda.is_available()`` is False; the GPU path never imports
this module.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: "_CudaToCpuMode | None" = None
_CPU = torch.device("cpu")

# Tensor.type() strings Megatron asserts on, by dtype.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def _is_cuda_device(dev) -> bool:
    """True for 'cuda', 'cuda:N', torch.device('cuda', N) and bare ints (CUDA ordinals)."""
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made in Python."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs:
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_device(dev):
                kwargs = dict(kwargs, device=_CPU)
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)  # pinning needs a CUDA runtime
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: records wall-clock time, never blocks."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False, **_):
        self._t = None

    def record(self, stream=None):
        import time
        self._t = time.perf_counter()

    def elapsed_time(self, end: "_CpuEvent") -> float:
        """Milliseconds between this event and ``end`` (as CUDA events report)."""
        if self._t is None or end._t is None:
            return 0.0
        return (end._t - self._t) * 1000.0

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """Stand-in for a CUDA stream: every operation is already ordered on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        event = event or _CpuEvent()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_STREAM = _CpuStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    # CUDA RNG -> the CPU generator (model_parallel_cuda_manual_seed, RNG tracker fork).
    # (torch.default_generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.random.manual_seed = cuda.manual_seed
    # Streams and events (inference controller timing, DDP overlap code).
    cuda.Event = _CpuEvent
    cuda.Stream = _CpuStream
    cuda.current_stream = lambda device=None: _NULL_STREAM
    cuda.default_stream = lambda device=None: _NULL_STREAM
    cuda.stream = lambda stream=None: _NULL_STREAM
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state

    # The forward's only hard-coded device='cuda' (transformer/utils.py:35,40 in 0.16.1): the
    # default masks of FusedScaleMaskSoftmax, built here on the CPU so the forward needs no mode.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        """``[sq, sq]`` bool, True above the diagonal (masked out)."""
        i = torch.arange(sq, device=_CPU)
        return i[None, :] > i[:, None]

    def get_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        """``[sq, skv]`` bool, True outside the band ``-w0 <= j - i - (skv - sq) <= w1``."""
        off = (torch.arange(skv, device=_CPU)[None, :] - torch.arange(sq, device=_CPU)[:, None]) - (skv - sq)
        return (off < -window_size[0]) | (off > window_size[1])

    for mod in (tutils, fused_softmax):
        if hasattr(mod, "get_default_causal_mask"):
            mod.get_default_causal_mask = get_default_causal_mask
        if hasattr(mod, "get_sliding_window_causal_mask"):
            mod.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def apply() -> None:
    """Install the shim (idempotent). Refuses to run when CUDA is available."""
    global _APPLIED, _MODE
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("carft_mega._cpu_shim must not be applied on a machine with CUDA")
    if "triton" not in sys.modules:
        # megatron.core imports triton; the interpreter must be chosen before that import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        warnings.warn("triton was imported before TRITON_INTERPRET=1 was set; Triton kernels "
                      "will fail on this CPU-only machine (set it before importing triton)")
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays on the mode stack for the life of the process
    _APPLIED = True


@contextlib.contextmanager
def suspended():
    """Run the body without the device-remapping mode (the model's forward needs none of it).

    A no-op unless the shim is applied and its mode is the innermost one (a mode pushed on
    top of it, e.g. ``with torch.device(...)``, is left alone and the shim's mode stays too).
    """
    if not _APPLIED or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def is_applied() -> bool:
    """Whether ``apply()`` has run in this process."""
    return _APPLIED
