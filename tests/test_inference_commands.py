"""``python -m carft_mega.evaluate`` and ``python -m carft_mega.generate`` (issue 13, item 10), on a
checkpoint and the HF export of one tiny SFT run: the command's evaluation is the trainer's own
(same rows), the HF export evaluates like the checkpoint, TP=2 under torchrun like TP=1, and the
generate command answers like the evaluation (greedy; top-k 1 sampling is greedy too)."""

import json
import os
import subprocess
import sys

import pytest

from carft_mega import evaluate, generate
from tests.trainer.test_e2e import REPO, run_in_process


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "run"
    res = run_in_process(str(out), "sft.max_steps=2", "ppo.enabled=false", "checkpoint.export_hf=true")
    return out, res


def _rows(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def _strip(rows):
    return [{k: r[k] for k in ("question", "gold", "pred", "correct", "generation")} for r in rows]


def test_evaluate_a_trainer_checkpoint_is_the_trainers_evaluation(tiny_run, tmp_path, capsys):
    out, res = tiny_run
    ckpt = out / "checkpoints" / "sft" / "step_00000002"
    assert evaluate.main(["--model", str(ckpt), "--out", str(tmp_path / "e.jsonl")]) == 0  # the run's test set
    printed = capsys.readouterr().out
    assert f"accuracy {res['sft_accuracy']:.4f}" in printed and "synthetic test set" in printed
    assert _strip(_rows(tmp_path / "e.jsonl")) == _strip(_rows(out / "eval" / "sft_step2.jsonl"))
    # A run directory means its latest checkpoint.
    assert evaluate.main(["--model", str(out), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert _rows(tmp_path / "r.jsonl") == _rows(tmp_path / "e.jsonl")


def test_evaluate_the_hf_export_like_the_checkpoint(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    common = ["--dataset", "synthetic", "--limit", "4", "--max-new-tokens", "24"]
    assert evaluate.main(["--model", str(out / "hf" / "sft"), *common, "--out", str(tmp_path / "hf.jsonl")]) == 0
    assert evaluate.main(["--model", str(out / "checkpoints" / "sft" / "step_00000002"), *common,
                          "--out", str(tmp_path / "ck.jsonl")]) == 0
    hf, ck = _rows(tmp_path / "hf.jsonl"), _rows(tmp_path / "ck.jsonl")
    assert len(hf) == 4 and _strip(hf) == _strip(ck)
    capsys.readouterr()
    assert evaluate.main(["--model", str(out / "hf" / "sft"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--dataset is required" in capsys.readouterr().err
    assert evaluate.main(["--model", str(out / "hf" / "sft"), "--dataset", "synthetic", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tp = 3") and "Traceback" not in err, err


def test_evaluate_under_torchrun_with_tp2(tiny_run, tmp_path):
    out, _ = tiny_run
    ckpt = out / "checkpoints" / "sft" / "step_00000002"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "carft_mega.evaluate", "--model", str(ckpt), "--tp", "2", "--out",
                           str(tmp_path / "tp2.jsonl")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("accuracy ") == 1  # rank 0 only
    # TP changes the order of sums only: the greedy answers are the TP=1 evaluation's.
    assert _strip(_rows(tmp_path / "tp2.jsonl")) == _strip(_rows(out / "eval" / "sft_step2.jsonl"))


def test_generate_answers_like_the_evaluation(tiny_run, capsys):
    out, _ = tiny_run
    ckpt = str(out / "checkpoints" / "sft" / "step_00000002")
    ref = _rows(out / "eval" / "sft_step2.jsonl")[:3]
    qs = sum((["--question", r["question"]] for r in ref), [])
    assert generate.main(["--model", ckpt, *qs, "--json"]) == 0
    greedy = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [g["generation"] for g in greedy] == [r["generation"] for r in ref]
    assert [g["answer"] for g in greedy] == [r["pred"] for r in ref]
    # top-k and top-p are allowed here (refused only for RL training); top-k 1 sampling is greedy.
    assert generate.main(["--model", ckpt, *qs, "--json", "--temperature", "1.0", "--top-k", "1", "--top-p", "0.9"]) == 0
    top1 = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [g["generation"] for g in top1] == [g["generation"] for g in greedy]
    assert generate.main(["--model", ckpt, *qs, "--json", "--temperature", "1.5", "--seed", "3"]) == 0
    hot = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(hot) == 3 and [g["generation"] for g in hot] != [g["generation"] for g in greedy]
