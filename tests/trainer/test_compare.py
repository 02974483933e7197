"""The comparison harness as a user runs it: ``QUICK=1 bash examples/compare_methods.sh`` (every
method, one seed, two RL steps from one shared SFT checkpoint), then a re-run that resumes."""

import csv
import os
import subprocess
import sys

from carft_mega.compare import ARMS, COMPARISON, CSV_FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(out, *extra):
    env = dict(os.environ, OUT=str(out), QUICK="1", PYTHON=sys.executable, OMP_NUM_THREADS="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "compare_methods.sh"), "logging.progress_bar=false",
                           "logging.tensorboard=false", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-6000:]
    return proc.stdout


def test_quick_comparison_writes_every_method_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    _run(out)
    for name in ("results.csv", "results.md", "curves.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 100, name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_FIELDS
    assert [r["method"] for r in rows] == COMPARISON  # one seed: one row per method, in order
    for r in rows:
        assert 0.0 <= float(r["final_accuracy"]) <= 1.0 and 0.0 <= float(r["best_accuracy"]) <= 1.0
        assert float(r["collapse"]) == float(r["best_accuracy"]) - float(r["final_accuracy"])
        if r["method"] != "sft":
            assert int(r["rl_steps"]) == 2 and float(r["rl_seconds"]) > 0 and int(r["generated_tokens"]) > 0
            assert float(r["initial_accuracy"]) == float(rows[0]["final_accuracy"])  # one shared SFT checkpoint
    tokens = {r["method"]: int(r["generated_tokens"]) for r in rows}
    assert tokens["drgrpo"] > 1.5 * tokens["reft"]  # G = 2 samples per prompt on the same prompts
    md = (out / "results.md").read_text()
    for key in COMPARISON[1:]:
        assert ARMS[key][0] in md
    # A re-run finds every run finished and only rewrites the tables.
    again = _run(out)
    assert again.count("done earlier") == len(COMPARISON) - 1 and "carft_mega.train" not in again
