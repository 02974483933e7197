"""Stop signals and timed saves (``trainer/stop.py``) in one process: SIGINT and SIGUSR1 are caught
like SIGTERM (tests/trainer/test_cluster.py sends SIGTERM under torchrun with 2 ranks and checks the
exact resume), ``checkpoint.save_interval_minutes`` saves on the clock, and a stopped SFT run resumes
at the next step."""

import os
import signal
import time

import pytest
import torch.distributed as dist

from carft_mega.trainer.stop import StopRequest
from tests.trainer.test_e2e import rows, run_in_process


@pytest.fixture
def world1():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1, signal.SIGTERM])
def test_each_stop_signal_is_recorded_not_fatal(world1, sig):
    import torch

    stop = StopRequest().install()
    try:
        assert stop.poll(torch.device("cpu")) == (None, False)
        os.kill(os.getpid(), sig)  # without the handler, SIGTERM/SIGUSR1 would kill pytest here
        time.sleep(0.05)
        assert stop.poll(torch.device("cpu")) == (sig, False)
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) is not stop._handler


def test_timed_save_is_due_after_the_interval(world1):
    import torch

    stop = StopRequest(save_interval_minutes=0.5 / 60)  # 0.5 s
    assert stop.poll(torch.device("cpu")) == (None, False)
    time.sleep(0.6)
    assert stop.poll(torch.device("cpu")) == (None, True)
    stop.note_saved()
    assert stop.poll(torch.device("cpu")) == (None, False)


def test_sigusr1_mid_sft_saves_then_resume_continues(tmp_path, capsys, monkeypatch):
    """SFT of 4 steps with a save interval shorter than a step (a checkpoint after every step) and
    SIGUSR1 arriving during step 2: the run stops after step 2 with its checkpoint and the one line;
    the same command again runs steps 3 and 4 only."""
    real_poll = StopRequest.poll
    calls = {"n": 0}

    def poll(self, device):
        calls["n"] += 1
        if calls["n"] == 2:  # the poll that ends step 2
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        return real_poll(self, device)

    monkeypatch.setattr(StopRequest, "poll", poll)
    out = tmp_path / "run"
    common = ["sft.max_steps=4", "ppo.enabled=false", "checkpoint.save_every=0",
              "checkpoint.save_interval_minutes=0.00001", "checkpoint.keep_last=10"]
    res = run_in_process(str(out), *common)
    assert res["stopped"]["signal"] == signal.SIGUSR1 and res["stopped"]["step"] == 2, res
    said = capsys.readouterr().out
    assert "stopped by SIGUSR1 after SFT step 2 of 4" in said and "To resume, run the same command again" in said
    steps = sorted(os.listdir(out / "checkpoints" / "sft"))
    assert [s for s in steps if s.startswith("step_")] == ["step_00000001", "step_00000002"]  # timed, then the stop
    assert not (out / "results.json").exists()

    monkeypatch.setattr(StopRequest, "poll", real_poll)
    res = run_in_process(str(out), *common)
    assert "stopped" not in res and "sft_accuracy" in res
    assert [r["step"] for r in rows(out, "sft")] == [1, 2, 3, 4]
    assert "resuming from" in capsys.readouterr().out
