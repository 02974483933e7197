"""Process groups, Megatron parallel state and seeds.

One call sets everything up, on a GPU box (NCCL) or a CPU-only one (gloo + the CPU shim),
under ``torchrun`` or in a plain single process (a 1-rank group)::

    from carft_mega import parallel
    parallel.init_distributed(cfg.parallel, seed=cfg.seed)
    tp = parallel.tp_group()            # pass groups explicitly to functions that communicate
    ...
    parallel.destroy()

Layout: world = tp * dp (no pipeline or context parallelism). Megatron orders ranks
tp-fastest, so ranks ``[0, 1]`` form the first TP group when tp = 2.

The getters *return* groups and ranks; functions elsewhere in the package that communicate take
``tp_group=`` / ``dp_group=`` arguments instead of looking these up (STYLE.md rule 13).
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from carft_mega.config import ParallelConfig


@dataclass(frozen=True)
class _State:
    tp: int
    dp: int
    sequence_parallel: bool
    backend: str
    device: torch.device
    owns_process_group: bool


_STATE: _State | None = None
_CREATED_PG = False  # this module created the default process group (and may destroy it)


def ensure_cpu_shim() -> None:
    """Apply the CPU compatibility shim when there is no CUDA device (no-op on a GPU box)."""
    if not torch.cuda.is_available():
        from carft_mega import _cpu_shim  # imported only on CPU-only machines

        _cpu_shim.apply()


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("config field 'parallel.backend' = 'nccl': no CUDA device on this machine; "
                         "use 'gloo' or 'auto'")
    return backend


def init_distributed(parallel_cfg: ParallelConfig, seed: int, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed, Megatron's parallel state (TP, DP, optional SP) and seeds.

    Under ``torchrun`` the usual ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` variables are used. In a
    plain process (no ``WORLD_SIZE``) a 1-rank group is created in memory, so tools and tests
    can build TP=1 models without a launcher. An already initialised default group is reused
    (and not destroyed by :func:`destroy`).

    Seeds: Python, NumPy and torch get ``seed`` (the same on every rank; data order and sampling
    that must differ per rank add the DP rank themselves), and Megatron's RNG tracker gets
    ``model_parallel_cuda_manual_seed(seed)`` (a TP-rank-dependent stream for TP-sharded dropout).

    Args:
        parallel_cfg: ``tp``, ``sequence_parallel`` and ``backend`` are used.
        seed: global seed.
        timeout_minutes: collective timeout.

    Raises:
        ValueError: if the world size is not a multiple of ``parallel_cfg.tp``, or sequence
            parallelism is asked for with tp = 1.
    """
    global _STATE, _CREATED_PG
    if _STATE is not None:
        raise RuntimeError("carft_mega.parallel.init_distributed was already called; call destroy() first")
    if not torch.cuda.is_available():
        ensure_cpu_shim()
    backend = _resolve_backend(parallel_cfg.backend)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    tp = parallel_cfg.tp
    if tp < 1 or world % tp:
        raise ValueError(f"config field 'parallel.tp' = {tp}: the world size {world} is not a multiple of it")
    if parallel_cfg.sequence_parallel and tp == 1:
        raise ValueError("config field 'parallel.sequence_parallel' = True: needs parallel.tp > 1")

    owns = _CREATED_PG and dist.is_initialized()
    if not dist.is_initialized():
        if backend == "nccl":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # Single process without a launcher: an in-memory store, no port to pick.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        owns = _CREATED_PG = True
    world = dist.get_world_size()

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             distributed_timeout_minutes=timeout_minutes)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _STATE = _State(tp=tp, dp=world // tp, sequence_parallel=parallel_cfg.sequence_parallel,
                    backend=backend, device=device, owns_process_group=owns)
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker (same seed on every rank)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def is_initialized() -> bool:
    """Whether :func:`init_distributed` has run (and :func:`destroy` has not)."""
    return _STATE is not None


def _state() -> _State:
    if _STATE is None:
        raise RuntimeError("carft_mega.parallel.init_distributed() has not been called")
    return _STATE


def tp_group() -> dist.ProcessGroup:
    """The tensor-parallel group of this rank."""
    _state()
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def dp_group() -> dist.ProcessGroup:
    """The data-parallel group of this rank."""
    _state()
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def tp_rank() -> int:
    """Rank of this process inside its TP group."""
    return dist.get_rank(tp_group())


def tp_size() -> int:
    """Tensor-parallel size."""
    return _state().tp


def dp_rank() -> int:
    """Rank of this process inside its DP group."""
    return dist.get_rank(dp_group())


def dp_size() -> int:
    """Data-parallel size."""
    return _state().dp


def sequence_parallel() -> bool:
    """Whether Megatron sequence parallelism is on."""
    return _state().sequence_parallel


def broadcast_object(obj, group: dist.ProcessGroup):
    """``obj`` from the first rank of ``group`` to every rank of it (pickled; small objects only)."""
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def world_rank() -> int:
    """Global rank."""
    return dist.get_rank()


def device() -> torch.device:
    """Where model tensors live: the local CUDA device, or the CPU."""
    return _state().device


def destroy(keep_process_group: bool = False) -> None:
    """Tear down Megatron's parallel state and the process group this module created.

    Args:
        keep_process_group: keep the default process group alive, so that a following
            :func:`init_distributed` (e.g. with another TP size or sequence parallelism) reuses it.
    """
    global _STATE, _CREATED_PG
    if _STATE is None:
        return
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _STATE.owns_process_group and dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
        _CREATED_PG = False
    _STATE = None
