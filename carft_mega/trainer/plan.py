"""The run's plan, printed before the first step, and time estimates from the first steps.

The plan gives every stage's steps, sequences and tokens. After the second step of a stage in this
launch (the first one includes warm-up) the measured time per step gives that stage's remaining
time; the SFT measurement also gives a rough estimate of the RL stage from its token count,
replaced by a measured one after the RL stage's second step. On a CPU a plan of real-model size
is said plainly to be out of reach, with the smoke preset that runs the same model end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carft_mega.trainer.context import Run, rl_total_steps, sft_total_steps

# A plan this big on a CPU will not finish (the paper's GSM8K SFT alone is ~5M tokens; SmolLM2-135M
# trains ~1e3 tokens/s on 2 cores).
CPU_TOKEN_BUDGET = 5_000_000
SMOKE_HINT = "SMOKE=1 bash examples/carft_gsm8k.sh"
_SAMPLE = 256  # records tokenised to estimate sequence lengths


def count(n: float) -> str:
    """``1,234`` below a million, ``12.35M`` above."""
    return f"{n:,.0f}" if n < 1e6 else f"{n / 1e6:,.2f}M"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass
class Plan:
    """Counts of one run, and the estimates printed as its first steps are timed.

    Attributes:
        sft_steps, rl_steps: steps of each stage (0 when disabled).
        sft_tokens_per_step: expected tokens of one SFT step (prompt + target).
        rl_train_tokens_per_step: token-equivalents of one RL step (generation, the no-grad forwards
            and U training passes), for the rough RL estimate from SFT's speed.
        on_cpu: the run's device is a CPU.
    """

    sft_steps: int
    rl_steps: int
    sft_tokens_per_step: float
    rl_train_tokens_per_step: float
    on_cpu: bool
    _timed: dict[str, list[float]] = field(default_factory=dict)
    _said: set = field(default_factory=set)

    def observe(self, run: Run, stage: str, step: int, seconds: float | None) -> None:
        """A step of ``stage`` (1-based, of the whole stage) took ``seconds``; prints the estimate
        after the second step this launch ran (after the first when it is the stage's last)."""
        if seconds is None or stage in self._said:
            return
        times = self._timed.setdefault(stage, [])
        times.append(seconds)
        total = self.sft_steps if stage == "sft" else self.rl_steps
        if len(times) < 2 and step < total:
            return
        self._said.add(stage)
        per = times[-1]
        left = total - step
        name = "SFT" if stage == "sft" else "RL"
        line = (f"estimate: {name} {per:.3g} s/step (step {step}) -> about {duration(per * left)} for the "
                f"remaining {left} of {total} steps")
        if stage == "sft" and self.rl_steps and self.sft_tokens_per_step:
            rl = per * self.rl_train_tokens_per_step / self.sft_tokens_per_step
            line += (f"; RL roughly {duration(rl)}/step -> {duration(rl * self.rl_steps)} for its {self.rl_steps} "
                     f"steps (from SFT's tokens/s; measured after its first steps)")
        run.print(line)
        if self.on_cpu and per * left > 6 * 3600:
            run.print(f"estimate: on this CPU the run will not finish in any useful time; `{SMOKE_HINT}` runs the "
                      f"same model end to end in a few minutes")


def _mean_lengths(run: Run) -> tuple[float, float]:
    """Mean (prompt tokens, prompt + target tokens) over the first training records."""
    from carft_mega.data.collate import encode_sft

    cfg = run.cfg
    recs = run.train[:_SAMPLE]
    enc = [encode_sft(r, run.tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_length) for r in recs]
    if not enc:
        return 0.0, 0.0
    return (sum(e.prompt_len for e in enc) / len(enc), sum(len(e.input_ids) for e in enc) / len(enc))


def print_plan(run: Run) -> Plan:
    """Print the whole plan (rank 0) and return it for the stages' estimates."""
    cfg = run.cfg
    n = len(run.train)
    sft_steps = sft_total_steps(cfg, n) if cfg.sft.enabled else 0
    rl_steps = rl_total_steps(cfg, n) if cfg.ppo.enabled else 0
    prompt_len, seq_len = _mean_lengths(run)
    G, U = cfg.rollout.samples_per_prompt, cfg.ppo.ppo_epochs
    rows = cfg.ppo.rollout_batch_size * G
    gen = cfg.rollout.max_new_tokens
    row_len = prompt_len + gen  # an upper bound: generations stop at EOS
    # Generation (a token per decode step, counted like a trained one: decoding is inefficient), the
    # old / reference / annotated forwards (~1/3 of a trained token each) and U training passes.
    rl_equiv = rows * gen + rows * row_len * (U + 1 + (U - 1) / 3)
    sft_tokens = cfg.sft.global_batch_size * seq_len
    plan = Plan(sft_steps=sft_steps, rl_steps=rl_steps, sft_tokens_per_step=sft_tokens,
                rl_train_tokens_per_step=rl_equiv, on_cpu=run.device.type == "cpu")
    done = {"sft": 0, "carft": 0}
    if run.resume is not None:
        done[run.resume.stage] = run.resume.step
        if run.resume.stage == "carft":
            done["sft"] = sft_steps
    lines = []
    if sft_steps:
        lines.append(f"plan: SFT {sft_steps:,} steps x {cfg.sft.global_batch_size} sequences = "
                     f"{sft_steps * cfg.sft.global_batch_size:,} sequences, about "
                     f"{count(sft_steps * sft_tokens)} tokens (mean {seq_len:.0f} per sequence)"
                     + (f"; {done['sft']:,} done" if done["sft"] else ""))
    if rl_steps:
        from carft_mega.trainer.carft import method_name

        ev = cfg.logging.eval_every
        lines.append(f"plan: {method_name(cfg)} {rl_steps:,} rollout steps x {cfg.ppo.rollout_batch_size} prompts x "
                     f"{G} sample(s) = {rl_steps * rows:,} rollouts of up to {gen} new tokens (at most "
                     f"{count(rl_steps * rows * gen)} generated), {U} PPO epochs each"
                     + (f"; {done['carft']:,} done" if done["carft"] else ""))
        lines.append(f"plan: greedy test accuracy on {len(run.test):,} problems "
                     + (f"every {ev} RL steps and " if ev else "") + "after each stage")
    ck = cfg.checkpoint
    lines.append(f"plan: checkpoints in {run.ckpts.root} " + (f"every {ck.save_every} steps, " if ck.save_every else "")
                 + (f"every {ck.save_interval_minutes:g} min, " if ck.save_interval_minutes else "")
                 + "at each stage's end and on SIGTERM/SIGINT/SIGUSR1; time estimates follow the first steps")
    for line in lines:
        run.print(line)
    total_tokens = sft_steps * sft_tokens + rl_steps * rl_equiv
    if plan.on_cpu and cfg.model.source != "tiny" and total_tokens > CPU_TOKEN_BUDGET:
        run.print(f"note: this plan (~{total_tokens / 1e6:,.0f}M token-equivalents) is sized for GPUs; on this CPU it "
                  f"will not finish. `{SMOKE_HINT}` runs the same model end to end in a few minutes.")
    return plan
