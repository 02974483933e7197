"""A run directory's record across launches (issue 13, items 4, 8 and 10's keep_best):

* the resolved config is written when a launch really starts, with one history file per launch;
* a finished run re-run says so and does nothing (no reload, no re-evaluation, no new rows);
* a resume compares its config with the checkpoint's: step limits and cadence may change (printed),
  anything else is refused naming the fields, unless checkpoint.allow_config_change=true;
* checkpoint.keep_best keeps the best-evaluated checkpoint out of keep_last's pruning.
"""

import json
import os

from carft_mega.train import main
from carft_mega.trainer.checkpoint import CheckpointManager
from tests.trainer.test_e2e import TINY

RUN = TINY + ["sft.max_steps=2", "ppo.max_steps=2", "checkpoint.save_every=1", "logging.eval_every=1"]


def launch(capsys, out, *extra):
    rc = main(RUN + [f"out_dir={out}", *extra])
    cap = capsys.readouterr()
    return rc, cap.out, [x for x in cap.err.splitlines() if x.startswith("error: ")]


def history(out):
    d = out / "config_history"
    return [(d / f).read_text().splitlines()[0] for f in sorted(os.listdir(d))]


def eval_rows(out):
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(x) for x in f]
    return [(r["stage"], r["step"]) for r in rows if "eval/accuracy" in r and "loss" not in r and "sft/loss" not in r]


def test_config_record_finished_rerun_and_resume_changes(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = launch(capsys, out)
    assert rc == 0 and "results: " in stdout
    assert history(out) == [history(out)[0]] and "fresh start" in history(out)[0]
    saved = (out / "config.yaml").read_text()
    ckpt = out / "checkpoints" / "carft" / "step_00000002"
    assert json.loads((ckpt / "carft_arch.json").read_text())["tokenizer"] == "char"  # item 1: every checkpoint
    assert json.loads((ckpt / "stage_end.json").read_text())["eval"]["tag"] == "carft_step2"
    metrics = (out / "metrics.jsonl").read_bytes()
    evals = sorted(os.listdir(out / "eval"))

    # The same command again: finished, nothing reloaded, re-evaluated or appended.
    rc, stdout, _ = launch(capsys, out)
    assert rc == 0 and "is finished" in stdout and "resuming from" not in stdout and "results: " not in stdout
    assert (out / "metrics.jsonl").read_bytes() == metrics and sorted(os.listdir(out / "eval")) == evals
    assert len(history(out)) == 1 and (out / "config.yaml").read_text() == saved

    # A change a resume may not make: refused, naming the field (and only that one), nothing written.
    rc, _, errors = launch(capsys, out, "ppo.max_steps=3", "ppo.lr=5e-4", "contrastive.signal=none")
    assert rc == 2 and len(errors) == 1, errors
    assert "ppo.lr 0.0001 -> 0.0005" in errors[0] and "contrastive.signal 'positive' -> 'none'" in errors[0]
    assert "ppo.max_steps" not in errors[0] and "checkpoint.allow_config_change=true" in errors[0]
    assert len(history(out)) == 1 and (out / "config.yaml").read_text() == saved

    # A longer RL stage and another eval cadence: allowed, said, recorded; one more step.
    rc, stdout, _ = launch(capsys, out, "ppo.max_steps=3", "logging.eval_every=2")
    assert rc == 0, stdout[-3000:]
    assert "config change on resume: ppo.max_steps 2 -> 3" in stdout
    assert "config change on resume: logging.eval_every 1 -> 2" in stdout
    assert f"resuming from {ckpt} (carft step 2)" in stdout
    h = history(out)
    assert len(h) == 2 and h[1].endswith(f"resumed from {ckpt}")
    assert "# config change on resume: ppo.max_steps 2 -> 3" in \
        (out / "config_history" / sorted(os.listdir(out / "config_history"))[1]).read_text()
    assert sorted(set(eval_rows(out))) == sorted(eval_rows(out))  # no evaluation row twice
    assert ("carft", 3) in eval_rows(out)

    # The named override lets any change through, and says which ones it let through.
    rc, stdout, _ = launch(capsys, out, "ppo.max_steps=4", "ppo.lr=5e-4", "checkpoint.allow_config_change=true")
    assert rc == 0, stdout[-3000:]
    assert "allowed by checkpoint.allow_config_change: ppo.lr 0.0001 -> 0.0005" in stdout
    assert len(history(out)) == 3


def _write(step):
    def write(tmp):
        with open(os.path.join(tmp, "w"), "w") as f:
            f.write(str(step))
    return write


def test_keep_best_survives_keep_last(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=1, keep_best=True)
    accs = {1: 0.30, 2: 0.50, 3: 0.40, 4: 0.45}
    for step, acc in accs.items():
        ref = mgr.save("carft", step, _write(step), {"step": step})
        assert mgr.record_eval(ref, f"carft_step{step}", acc) == (step in (1, 2))
    # keep_last=1 keeps step 4 (the latest) and step 2 (the best); 1 and 3 are pruned.
    assert [r.step for r in mgr.list("carft")] == [2, 4]
    best = json.loads((tmp_path / "ckpt" / "best.json").read_text())
    assert best == {"checkpoint": "carft/step_00000002", "accuracy": 0.5, "tag": "carft_step2"}
    assert json.loads((tmp_path / "ckpt" / "carft" / "step_00000004" / "eval.json").read_text())["accuracy"] == 0.45
    # Without keep_best the same sequence keeps only the latest.
    plain = CheckpointManager(str(tmp_path / "plain"), keep_last=1)
    for step, acc in accs.items():
        plain.record_eval(plain.save("carft", step, _write(step), {"step": step}), "t", acc)
    assert [r.step for r in plain.list("carft")] == [4] and not (tmp_path / "plain" / "best.json").exists()
    # A new manager (a resumed run) reads the best back.
    again = CheckpointManager(str(tmp_path / "ckpt"), keep_last=1, keep_best=True)
    assert again.best()["accuracy"] == 0.5 and not again.would_be_best(0.5) and again.would_be_best(0.51)
