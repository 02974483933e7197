"""A non-finite loss or gradient skips the update, leaves every weight as it was, is logged, and stops
the run after ``ppo.max_nonfinite_steps`` such steps in a row (CPU, tiny model, in process).

The faults are injected by wrapping the policy loss the trainer calls: one step returns a NaN loss,
another a finite loss whose gradient is NaN (the ``torch.where`` over a NaN branch), which only the
gradient-buffer check can catch.
"""

import json
import os

import pytest
import torch

import carft_mega.trainer.carft as carft_mod
from carft_mega.trainer.engine import Engine
from carft_mega.trainer.context import TrainingStopped

from .test_e2e import run_in_process


def _flat_params(engine):
    return torch.cat([p.detach().reshape(-1).clone() for p in engine.policy.parameters()])


def test_nonfinite_updates_are_skipped_logged_and_stop_the_run(tmp_path, monkeypatch, capsys):
    calls = []  # one entry per optimizer step: (skipped, params before, params after)
    fault = {"kind": None}
    real_loss, real_step = carft_mod.ppo_policy_loss, Engine.optimizer_step

    def faulty_loss(logp, *args, **kwargs):
        loss, metrics = real_loss(logp, *args, **kwargs)
        if fault["kind"] == "nan_loss":
            loss = loss + float("nan")
        elif fault["kind"] == "nan_grad":
            # Forward value is finite (the NaN branch is not selected); its backward is 0 * NaN = NaN.
            bad = torch.sqrt(logp.sum() * 0.0 - 1.0)
            loss = loss + torch.where(torch.tensor(True), torch.zeros(()), bad)
        return loss, metrics

    def recording_step(self, loss_is_finite):
        before = _flat_params(self)
        out = real_step(self, loss_is_finite)
        calls.append((out["optim/skipped"], before, _flat_params(self)))
        # Faults for the next rollout step: step 1 clean, step 2 NaN loss, step 3 NaN gradient.
        fault["kind"] = {1: "nan_loss", 2: "nan_grad"}.get(len(calls))
        return out

    monkeypatch.setattr(carft_mod, "ppo_policy_loss", faulty_loss)
    monkeypatch.setattr(Engine, "optimizer_step", recording_step)
    out = str(tmp_path / "run")
    with pytest.raises(TrainingStopped, match="RL stopped at step 3: 2 consecutive"):
        run_in_process(out, "sft.enabled=false", "ppo.max_steps=6", "ppo.ppo_epochs=1",
                       "ppo.max_nonfinite_steps=2", "logging.log_every=5", "contrastive.signal=both")

    assert [c[0] for c in calls] == [0.0, 1.0, 1.0]
    assert not torch.equal(calls[0][1], calls[0][2])  # the clean step moved the weights
    for _, before, after in calls[1:]:
        assert torch.equal(before, after)  # skipped: not one weight changed
    assert torch.equal(calls[2][2], calls[0][2])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [r for r in map(json.loads, f) if r["stage"] == "carft" and "optim/skipped" in r]
    # log_every=5 would log none of steps 1-3; skipped steps are logged regardless.
    assert [(r["step"], r["optim/skipped"]) for r in logged] == [(2, 1.0), (3, 1.0)]
    # The JSONL stays strict JSON: non-finite values are written as strings.
    assert [r["optim/grad_norm"] for r in logged] == ["nan", "nan"]
    assert logged[0]["loss"] == "nan" and isinstance(logged[1]["loss"], float)  # step 3: only the gradient
    printed = capsys.readouterr().out
    assert "RL step 2: update skipped" in printed and "RL step 3: update skipped" in printed
    assert "RL step 1: update skipped" not in printed


def test_sft_stops_on_its_own_field(tmp_path, monkeypatch):
    """SFT counts non-finite steps against sft.max_nonfinite_steps, not the RL stage's field."""
    real_step = Engine.optimizer_step
    monkeypatch.setattr(Engine, "optimizer_step", lambda self, ok: real_step(self, torch.tensor(False)))
    with pytest.raises(TrainingStopped, match=r"SFT stopped: 3 consecutive .*sft\.max_nonfinite_steps"):
        run_in_process(str(tmp_path / "sft"), "sft.max_steps=5", "sft.max_nonfinite_steps=3",
                       "ppo.max_nonfinite_steps=1")
