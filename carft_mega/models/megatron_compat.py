"""Work-arounds for megatron-core 0.16.1 optimizer checkpointing on the torch-Adam path.

Without Apex or Transformer Engine, Megatron's optimizers wrap ``torch.optim.Adam``/``AdamW``.
That path has two bugs when a **fresh** ``DistributedOptimizer`` loads a dist_checkpointing
checkpoint (``../shared/notes/megatron_triton_on_cpu.md`` Sec. 3; they are not CPU-specific,
a GPU box without Apex/TE hits them too):

1. ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` calls ``state_dict()``, which
   asserts that every parameter already has a torch-Adam ``step``: an optimizer that never
   stepped has none. :func:`prepare_optimizer_for_load` creates zero state (``step``,
   ``exp_avg``, ``exp_avg_sq``), which the load then overwrites.
2. ``_set_main_param_and_optimizer_states`` copies every key of the existing state, including
   ``step`` which the fully-reshardable checkpoint does not carry per tensor (KeyError), and
   copies into fp32 main params that require grad outside ``no_grad`` (autograd error). The
   replacement installed here skips absent keys and copies under ``no_grad``; ``step`` is
   restored by Megatron itself from the param groups.
3. ``DistributedOptimizer.load_state_dict`` then gives every parameter the *same* ``step``
   tensor; torch Adam increments it in place once per parameter, so after a reload the bias
   correction runs ahead by the number of parameters per step. :func:`finish_optimizer_load`
   gives each parameter its own copy.

Use ``OPTIMIZER_SHARDING_METADATA`` (``fully_reshardable``) for every optimizer
``sharded_state_dict`` call: the default format raises "ShardedTensor.flattened_range is not
supported", and ``dp_reshardable`` loses ``step`` and cannot change TP.
"""

from __future__ import annotations

import torch

OPTIMIZER_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""``metadata=`` for ``optimizer.sharded_state_dict`` (save and load)."""

_PATCHED = False


def uses_torch_adam() -> bool:
    """True when Megatron's optimizers fall back to torch Adam (no Apex, no Transformer Engine)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    """Replacement for ``DistributedOptimizer._set_main_param_and_optimizer_states`` (torch-Adam path)."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    with torch.no_grad():
        for key, value in tensors.items():
            if key in dst:
                dst[key].copy_(value)


def patch_distributed_optimizer() -> None:
    """Install the ``_set_main_param_and_optimizer_states`` fix (idempotent; torch-Adam path only)."""
    global _PATCHED
    if _PATCHED or not uses_torch_adam():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    _PATCHED = True


def _leaf_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


def prepare_optimizer_for_load(optimizer) -> None:
    """Give a fresh Megatron optimizer zero torch-Adam state so it can load a checkpoint.

    Call it after ``get_megatron_optimizer`` and before ``optimizer.sharded_state_dict(...,
    is_loading=True)``. No-op for parameters that already have state and with Apex/TE.
    """
    if not uses_torch_adam():
        return
    patch_distributed_optimizer()
    for opt in _leaf_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def finish_optimizer_load(optimizer) -> None:
    """Call after ``optimizer.load_state_dict(...)``: un-share the torch-Adam ``step`` tensors (bug 3)."""
    for opt in _leaf_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        seen: set[int] = set()
        for state in inner.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(step))


# --------------------------------------------------------------------------------------------
# dist_checkpointing's helper processes and stop signals

_RESULTS_MANAGER = None  # keeps the Manager below alive for the life of the process


def _ignore_stop_signals() -> None:  # runs in the Manager's server process (module level: spawn pickles it)
    import signal

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def shield_checkpoint_helpers() -> None:
    """Start dist_checkpointing's long-lived helper processes so that stop signals do not kill them.

    megatron-core 0.16.1's checkpoint writer (``strategies/filesystem_async.py``) creates, at the
    first save, a ``spawn`` ``Manager`` for its results queue, and multiprocessing a resource
    tracker; both stay alive in the trainer's process group. A stop signal sent to that group
    (torchrun's agent forwards with ``killpg``, Ctrl-C reaches the whole foreground group, Slurm
    signals every process of a job step) kills them, and the checkpoint the trainer then saves
    fails with ``BrokenPipeError``. Here the Manager is started first, with the stop signals
    ignored in it, and installed as the writer's queue; the resource tracker ignores SIGINT and
    SIGTERM itself and is started with SIGUSR1 blocked (a blocked mask survives ``exec``). Call
    from the main thread, before the first save; idempotent.
    """
    global _RESULTS_MANAGER
    import multiprocessing as mp
    import signal
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):  # another megatron-core: its writer is unknown here
        return
    if _RESULTS_MANAGER is not None or filesystem_async._results_queue is not None:
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_ignore_stop_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    filesystem_async._results_queue = manager.Queue()
    _RESULTS_MANAGER = manager
