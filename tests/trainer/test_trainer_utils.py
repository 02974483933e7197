"""LR schedule, atomic checkpoint manager and the metrics logger (single process)."""

import json
import os

import pytest

from carft_mega.trainer.checkpoint import CheckpointManager
from carft_mega.trainer.metrics import MetricsLogger, StageTimer
from carft_mega.trainer.schedule import lr_at


def test_lr_schedules_against_formula():
    total, peak = 20, 1e-3
    for step in range(total):
        assert lr_at(step, total, peak, "constant", 0.0) == peak
        warm = 2
        if step < warm:
            expect = peak * (step + 1) / warm
        else:
            expect = peak * (total - step) / (total - warm)
        assert lr_at(step, total, peak, "linear", 0.1) == pytest.approx(expect)
    assert lr_at(0, 1, peak, "linear", 0.0) == peak
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, peak, "cosine", 0.0)


def _write(files):
    def write(tmp):
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    return write


def test_checkpoint_atomic_latest_and_prune(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    assert mgr.latest() is None and mgr.resolve("auto") is None
    for step in (1, 2, 3):
        mgr.save("sft", step, _write({"w": str(step)}), {"step": step})
    refs = mgr.list("sft")
    assert [r.step for r in refs] == [2, 3]
    mgr.save("carft", 1, _write({"w": "c1"}), {"step": 1})
    latest = mgr.latest()
    assert (latest.stage, latest.step) == ("carft", 1)
    assert mgr.read_state(latest) == {"step": 1}
    assert open(tmp_path / "ckpt" / "latest").read().strip() == "carft/step_00000001"
    # A crashed save (no COMPLETE) is never picked.
    crashed = tmp_path / "ckpt" / "carft" / "step_00000009"
    crashed.mkdir()
    assert mgr.latest().step == 1
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        mgr.resolve(str(crashed))
    assert mgr.resolve(str(refs[0].path)).step == 2
    with pytest.raises(ValueError, match="step_NNNNNNNN"):
        mgr.resolve(str(tmp_path))
    assert mgr.resolve("none") is None


def test_metrics_logger_jsonl_plot_and_resume(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=True, progress_bar=False)
    for s in range(1, 4):
        log.log("sft", s, {"sft/loss": 1.0 / s, "junk": [1, 2]})
    for s in range(1, 3):
        log.log("carft", s, {"reward/score": 0.1 * s, "eval/accuracy": 0.5, "actor/pg_loss": float("nan")})
    log.close()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 5 and "junk" not in rows[0] and rows[-1]["actor/pg_loss"] == "nan"
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    assert os.listdir(tmp_path / "tb")
    # Resume at carft step 1: later rows are dropped and will be logged again.
    log2 = MetricsLogger(str(tmp_path), tensorboard=False, progress_bar=False)
    log2.truncate_after("carft", 1)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 1), ("sft", 2), ("sft", 3), ("carft", 1)]
    log2.close()


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(str(tmp_path / "x"), enabled=False)
    log.log("sft", 1, {"a": 1.0})
    log.close()
    assert not (tmp_path / "x").exists()


def test_stage_timer_accumulates():
    t = StageTimer()
    with t("a"):
        pass
    with t("a"):
        pass
    with t("b"):
        pass
    m = t.metrics()
    assert set(m) == {"time/a", "time/b", "time/step"} and m["time/step"] >= m["time/a"]
