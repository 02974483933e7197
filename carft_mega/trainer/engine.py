"""The trainable unit of a stage: the policy in Megatron DDP with Megatron's optimizer.

Gradient convention: every loss a rank computes is its share of the *global* loss (normalised by
global token or sample counts). Megatron's DDP averages gradients over data-parallel ranks, so
``backward`` scales by the DP size to turn that average into the sum of the shares
(``Engine.backward``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from carft_mega import parallel
from carft_mega.config import OptimConfig
from carft_mega.trainer.schedule import lr_at


@dataclass
class Engine:
    """Policy + DDP + optimizer + LR schedule of one stage.

    Attributes:
        policy: the unwrapped ``PolicyModel`` (for generation and checkpoint state dicts).
        ddp: the Megatron ``DistributedDataParallel`` wrapper (for training forwards).
        optimizer: a Megatron optimizer (Adam with decoupled weight decay).
        peak_lr, schedule, warmup_ratio, total_steps: the LR schedule.
        step: optimizer steps taken (including skipped ones).
    """

    policy: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: object
    peak_lr: float
    schedule: str
    warmup_ratio: float
    total_steps: int
    step: int = 0
    nonfinite_streak: int = 0
    _dp_scale: float = field(default=1.0, repr=False)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of the global loss (see module docstring)."""
        (loss * self._dp_scale).backward()

    def lr(self) -> float:
        return lr_at(self.step, self.total_steps, self.peak_lr, self.schedule, self.warmup_ratio)

    def optimizer_step(self, loss_is_finite: bool | torch.Tensor) -> dict[str, float]:
        """Reduce gradients, then step unless any rank saw a non-finite loss or gradient.

        One host-device sync: the finiteness flags are combined on the device and reduced once.

        Args:
            loss_is_finite: this rank's micro-batch losses were all finite (bool or 0-d tensor).

        Returns:
            ``optim/lr``, ``optim/grad_norm``, ``optim/skipped`` (1.0 when the update was skipped).
        """
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])
        ok = torch.as_tensor(loss_is_finite, device=parallel.device()).bool().reshape(1)
        for b in self.ddp.buffers:
            ok &= torch.isfinite(b.grad_data).all()
        ok = ok.float()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        lr = self.lr()
        self.step += 1
        if ok.item() < 1.0:
            self.nonfinite_streak += 1
            self.zero_grad()
            return {"optim/lr": lr, "optim/grad_norm": float("nan"), "optim/skipped": 1.0}
        self.nonfinite_streak = 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        _, grad_norm, _ = self.optimizer.step()
        return {"optim/lr": lr, "optim/grad_norm": float(grad_norm or 0.0), "optim/skipped": 0.0}


def build_engine(policy: torch.nn.Module, optim: OptimConfig, *, peak_lr: float, schedule: str,
                 warmup_ratio: float, total_steps: int, distributed_optimizer: bool) -> Engine:
    """Wrap ``policy`` in Megatron DDP and build its optimizer.

    Args:
        policy: a ``PolicyModel`` on this rank's device.
        optim: betas, eps, weight decay, gradient clip.
        peak_lr, schedule, warmup_ratio, total_steps: the stage's LR schedule.
        distributed_optimizer: shard optimizer state over DP (Megatron DistributedOptimizer).
    """
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = policy.config
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                           use_distributed_optimizer=distributed_optimizer), policy)
    # Without it Megatron's schedules skip the DP all-reduce (notes: megatron_triton_on_cpu.md).
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    bf16 = cfg.params_dtype == torch.bfloat16
    fp16 = cfg.params_dtype == torch.float16
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=peak_lr, min_lr=0.0, weight_decay=optim.weight_decay,
                        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                        clip_grad=optim.clip_grad, bf16=bf16, fp16=fp16, params_dtype=cfg.params_dtype,
                        use_distributed_optimizer=distributed_optimizer),
        [ddp])
    return Engine(policy=policy, ddp=ddp, optimizer=optimizer, peak_lr=peak_lr, schedule=schedule,
                  warmup_ratio=warmup_ratio, total_steps=total_steps,
                  _dp_scale=float(parallel.dp_size()))


# --------------------------------------------------------------------------------------------
# Checkpoint I/O (called inside CheckpointManager.save / on resume)


def rng_state() -> dict:
    """This rank's RNG states (Python, NumPy, torch, CUDA, Megatron's tracker)."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_engine(engine: Engine, ckpt_dir: str, tokenizer_dir: str | None = None) -> None:
    """Model + optimizer (dist_checkpointing, reshardable over TP and DP), arch JSON, tokenizer and RNG.

    Collective. ``ckpt_dir`` exists. The directory is also a valid ``model.source=mcore`` path (its
    tokenizer included: ``tokenizer/``, or ``"char"`` in ``carft_arch.json``) and an input of
    ``tools/convert_megatron_to_hf.py``.

    Args:
        tokenizer_dir: ``Run.tokenizer_dir``: ``"char"`` or a tokenizer directory to copy.
    """
    from megatron.core import dist_checkpointing

    from carft_mega.models.arch import write_arch_json
    from carft_mega.models.build import checkpoint_info, save_checkpoint_tokenizer
    from carft_mega.models.megatron_compat import OPTIMIZER_SHARDING_METADATA

    policy = engine.policy
    msd = policy.sharded_state_dict()
    dist_checkpointing.save(
        {"model": msd, "optimizer": engine.optimizer.sharded_state_dict(msd, metadata=OPTIMIZER_SHARDING_METADATA)},
        ckpt_dir)
    os.makedirs(os.path.join(ckpt_dir, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(ckpt_dir, "rng", f"rank{dist.get_rank():05d}.pt"))
    if dist.get_rank() == 0:
        # cot_proj_dim, dtype and the source's HF token ids: the HF export needs all three.
        tok = save_checkpoint_tokenizer(tokenizer_dir, ckpt_dir)
        write_arch_json(ckpt_dir, policy.arch, policy.padded_vocab_size, tok, checkpoint_info(policy))


def load_engine(engine: Engine, ckpt_dir: str, restore_rng: bool = True) -> None:
    """Load model + optimizer written by ``save_engine`` (any TP/DP) and this rank's RNG state."""
    from megatron.core import dist_checkpointing

    from carft_mega.models.megatron_compat import (OPTIMIZER_SHARDING_METADATA, finish_optimizer_load,
                                                   prepare_optimizer_for_load)

    prepare_optimizer_for_load(engine.optimizer)
    msd = engine.policy.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": msd,
         "optimizer": engine.optimizer.sharded_state_dict(msd, is_loading=True,
                                                          metadata=OPTIMIZER_SHARDING_METADATA)},
        ckpt_dir)
    engine.policy.load_state_dict(loaded["model"])
    engine.optimizer.load_state_dict(loaded["optimizer"])
    finish_optimizer_load(engine.optimizer)  # megatron-core 0.16.1 shares one Adam `step` tensor
    rng_file = os.path.join(ckpt_dir, "rng", f"rank{dist.get_rank():05d}.pt")
    if restore_rng and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))


def export_stage_hf(run, policy, stage: str) -> str | None:
    """``checkpoint.export_hf``: write ``<out_dir>/hf/<stage>`` (HF config + safetensors + the run's
    tokenizer, the CoT head as ``v_head.safetensors``; loads with ``AutoModelForCausalLM`` and
    ``AutoTokenizer``). Written next to it and renamed into place, so the directory is complete or
    absent. Collective; returns the path (None when disabled)."""
    if not run.cfg.checkpoint.export_hf:
        return None
    import shutil

    import torch.distributed as dist

    from carft_mega.models.build import export_hf

    path = os.path.join(run.cfg.out_dir, "hf", stage)
    tmp = path + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    export_hf(policy, tmp, tokenizer_dir=run.tokenizer_dir)
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()
    run.print(f"exported the {stage} policy as an HF model: {path}")
    return path


def finish_stage(run, stage: str, ref, policy, tag: str) -> float:
    """What follows a stage's final checkpoint ``ref``: the HF export (``checkpoint.export_hf``) and
    the greedy evaluation, each done once and recorded in ``ref/stage_end.json``, so that a run
    resumed from ``ref`` (after a crash or a stop signal) neither repeats them nor logs a second
    evaluation row. ``policy`` may be None: it is loaded from ``ref`` only if something is left to do.

    Returns:
        The stage's test accuracy.
    """
    from carft_mega.trainer.evaluate import evaluate

    cfg = run.cfg
    rec = run.ckpts.read_stage_end(ref)
    todo_export = cfg.checkpoint.export_hf and not rec.get("export")
    if (todo_export or "eval" not in rec) and policy is None:
        from carft_mega.models.build import load_policy_checkpoint

        policy = load_policy_checkpoint(ref.path, cfg.model).to(run.device)
    if todo_export:
        rec["export"] = os.path.relpath(export_stage_hf(run, policy, stage), cfg.out_dir)
        run.ckpts.write_stage_end(ref, rec)
    if "eval" not in rec:
        acc = evaluate(run, policy, tag=tag)
        rec["eval"] = {"tag": tag, "accuracy": acc}
        run.ckpts.write_stage_end(ref, rec)
        run.ckpts.record_eval(ref, tag, acc)
        run.logger.log(stage, ref.step, {"eval/accuracy": acc}, advance=False)
    return rec["eval"]["accuracy"]
