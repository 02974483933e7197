"""Stage 1: supervised warm-up on prompt -> annotated CoT + answer line + EOS (DESIGN.md Sec. 1).

The loss is the token-mean NLL over the target tokens of the whole global batch (prompt tokens
carry no loss), so it does not depend on the micro-batch or data-parallel size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from carft_mega import parallel
from carft_mega.data.collate import collate_sft, encode_sft, micro_batches, padding_share
from carft_mega.trainer.checkpoint import CheckpointRef
from carft_mega.trainer.engine import Engine, build_engine, export_stage_hf, load_engine, save_engine
from carft_mega.trainer.evaluate import evaluate
from carft_mega.trainer.metrics import StageTimer
from carft_mega.trainer.context import Run, TrainingStopped, build_initial_policy, sft_total_steps

SFT_DATA_SALT = 0


def sft_step(run: Run, engine: Engine) -> dict[str, float]:
    """One optimizer step of SFT over a global batch."""
    cfg = run.cfg
    timer = StageTimer()
    idx = run.local_indices(engine.step, cfg.sft.global_batch_size, SFT_DATA_SALT)
    examples = [encode_sft(run.train[i], run.tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_length)
                for i in idx]
    counts = torch.tensor([float(sum(len(e.input_ids) - e.prompt_len for e in examples)),
                           float(sum(len(e.input_ids) for e in examples))], device=run.device)
    dist.all_reduce(counts, group=parallel.dp_group())
    n_target = counts[0].clamp(min=1.0)
    engine.zero_grad()
    finite = torch.ones((), dtype=torch.bool, device=run.device)
    loss_sum = torch.zeros((), device=run.device)
    lengths = [len(e.input_ids) for e in examples]
    groups = micro_batches(lengths, cfg.sft.micro_batch_size)  # similar lengths together: less padding
    with timer("update"):
        for rows in groups:
            batch = collate_sft([examples[i] for i in rows.tolist()], run.tokenizer.pad_id)
            tokens = batch["tokens"].to(run.device)
            loss_mask = batch["loss_mask"].to(run.device)
            out = engine.ddp(tokens)
            loss = -(out.logp * loss_mask).sum() / n_target
            finite &= torch.isfinite(loss)
            engine.backward(loss)
            loss_sum += loss.detach()
        metrics = engine.optimizer_step(finite)
    dist.all_reduce(loss_sum, group=parallel.dp_group())
    metrics["sft/loss"] = loss_sum.item()
    metrics["perf/tokens_per_s"] = counts[1].item() / max(timer.times["update"], 1e-9)
    metrics["perf/pad_frac"] = padding_share(lengths, cfg.sft.micro_batch_size)
    metrics.update(timer.metrics())
    return metrics


def run_sft(run: Run, resume: CheckpointRef | None) -> CheckpointRef:
    """Train (or finish training) the SFT stage; returns its final checkpoint."""
    cfg = run.cfg
    total = sft_total_steps(cfg, len(run.train))
    if resume is not None and resume.step >= total:
        run.print(f"SFT already complete ({resume.path})")
        return resume
    policy = build_initial_policy(run)
    engine = build_engine(policy, cfg.optim, peak_lr=cfg.sft.lr, schedule=cfg.sft.schedule,
                          warmup_ratio=cfg.sft.warmup_ratio, total_steps=total,
                          distributed_optimizer=cfg.parallel.distributed_optimizer)
    if resume is not None:
        load_engine(engine, resume.path)
        state = run.ckpts.read_state(resume)
        engine.step, engine.nonfinite_streak = state["step"], state["nonfinite_streak"]
    run.print(f"SFT: {total} steps of {cfg.sft.global_batch_size} sequences, lr {cfg.sft.lr} ({cfg.sft.schedule})")
    run.logger.start_stage("sft", total, engine.step)
    while engine.step < total:
        metrics = sft_step(run, engine)
        skipped = metrics.get("optim/skipped", 0.0) > 0.0
        if skipped:
            run.print(f"SFT step {engine.step}: update skipped, non-finite loss or gradient "
                      f"({engine.nonfinite_streak} in a row, the run stops at {cfg.sft.max_nonfinite_steps})")
        run.logger.log("sft", engine.step, metrics if skipped or engine.step % cfg.logging.log_every == 0
                       or engine.step == total else {})
        if engine.nonfinite_streak >= cfg.sft.max_nonfinite_steps:
            raise TrainingStopped(f"SFT stopped: {engine.nonfinite_streak} consecutive steps with a non-finite "
                                  f"loss or gradient (sft.max_nonfinite_steps)")
        if cfg.checkpoint.save_every and engine.step % cfg.checkpoint.save_every == 0 and engine.step < total:
            save_sft(run, engine)
    ref = save_sft(run, engine)
    export_stage_hf(run, engine, "sft")
    acc = evaluate(run, engine.policy, tag=f"sft_step{engine.step}")
    run.results["sft_accuracy"] = acc
    run.results["sft_checkpoint"] = ref.path
    run.logger.log("sft", engine.step, {"eval/accuracy": acc}, advance=False)
    run.print(f"accuracy after SFT: {acc:.4f} on {len(run.test)} test problems")
    return ref


def save_sft(run: Run, engine: Engine) -> CheckpointRef:
    state = {"stage": "sft", "step": engine.step, "total_steps": engine.total_steps,
             "nonfinite_streak": engine.nonfinite_streak}
    return run.ckpts.save("sft", engine.step, lambda d: save_engine(engine, d, run.tokenizer_dir), state)
