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


def test_checkpoints_of_an_abandoned_history_are_set_aside(tmp_path):
    """A fresh start, or a resume from an older checkpoint, moves the later checkpoints out of the
    way (nothing deleted): they neither win resume=auto nor get pruned in place of new ones."""
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(str(root), keep_last=3)
    for step in (100, 200, 300):
        mgr.save("carft", step, _write({"w": f"old{step}"}), {"step": step})
    mgr.save("sft", 7, _write({"w": "old-sft"}), {"step": 7})
    # Resume from the SFT checkpoint: the three RL checkpoints after it go, the SFT one stays.
    keep = mgr.resolve(str(root / "sft" / "step_00000007"))
    dest, count = mgr.set_aside(keep)
    assert count == 3 and os.path.dirname(dest) == str(tmp_path)
    assert sorted(os.listdir(os.path.join(dest, "carft"))) == [f"step_{s:08d}" for s in (100, 200, 300)]
    assert open(os.path.join(dest, "carft", "step_00000300", "w")).read() == "old300"
    assert [(r.stage, r.step) for r in mgr.list()] == [("sft", 7)]
    assert open(root / "latest").read().strip() == "sft/step_00000007"
    # The new history: a low-numbered RL checkpoint is the latest and survives pruning.
    mgr.save("carft", 10, _write({"w": "new10"}), {"step": 10})
    assert (mgr.resolve("auto").stage, mgr.resolve("auto").step) == ("carft", 10)
    assert mgr.set_aside(mgr.resolve("auto")) is None  # resume=auto moves nothing
    # A fresh start (resume=none) moves everything, and a second one within the second gets its own folder.
    dest2, count2 = mgr.set_aside(None)
    assert count2 == 2 and dest2 != dest and mgr.list() == [] and not (root / "latest").exists()
    mgr.save("sft", 1, _write({"w": "x"}), {"step": 1})
    dest3, _ = mgr.set_aside(None)
    assert dest3 not in (dest, dest2) and os.path.exists(os.path.join(dest3, "sft", "step_00000001", "w"))


def test_resaving_a_step_replaces_it_whole(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    mgr.save("carft", 5, _write({"a": "1", "b": "1"}), {"v": 1})
    ref = mgr.save("carft", 5, _write({"a": "2"}), {"v": 2})
    assert sorted(os.listdir(ref.path)) == ["COMPLETE", "a", "trainer_state.json"]
    assert mgr.read_state(ref) == {"v": 2} and open(os.path.join(ref.path, "a")).read() == "2"
    # A crash between moving the old copy aside and deleting it leaves a *.old that the next save prunes.
    os.makedirs(ref.path + ".old")
    mgr.save("carft", 6, _write({"a": "3"}), {"v": 3})
    assert not os.path.exists(ref.path + ".old")


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


@pytest.mark.parametrize("dp", [1, 2])
def test_rl_batches_never_straddle_an_epoch(monkeypatch, dp):
    """drop_last: every global batch holds distinct records from one epoch's shuffle; each epoch
    leaves out n mod B records; DP ranks split the batch; SFT's stream (no drop_last) is unchanged."""
    from types import SimpleNamespace

    from carft_mega import parallel
    from carft_mega.trainer import context as run_mod

    n, B = 10, 4
    fake = SimpleNamespace(train=list(range(n)), cfg=SimpleNamespace(seed=3))
    monkeypatch.setattr(parallel, "dp_size", lambda: dp)

    def global_batch(step, drop_last):
        parts = []
        for r in range(dp):
            monkeypatch.setattr(parallel, "dp_rank", lambda r=r: r)
            parts += run_mod.Run.local_indices(fake, step, B, salt=1, drop_last=drop_last)
        return parts

    for epoch in range(3):
        order = run_mod._epoch_order(n, 3 + 1, epoch).tolist()
        seen = []
        for j in range(n // B):
            batch = global_batch(epoch * (n // B) + j, True)
            assert len(set(batch)) == B
            assert batch == order[j * B:(j + 1) * B]
            seen += batch
        assert len(set(seen)) == (n // B) * B
    # Without drop_last the stream runs on across epochs (step 2 straddles epochs 0 and 1).
    stream = run_mod._epoch_order(n, 4, 0).tolist() + run_mod._epoch_order(n, 4, 1).tolist()
    assert global_batch(2, False) == stream[8:12]
    cfg = SimpleNamespace(ppo=SimpleNamespace(max_steps=None, epochs=3, rollout_batch_size=B))
    assert run_mod.rl_total_steps(cfg, n) == 3 * (n // B)
