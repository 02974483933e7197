"""The trainer as a cluster job, on one machine (CPU, gloo), through ``examples/_launch.sh`` and
``python -m carft_mega.launch`` exactly as the example scripts and the Slurm job start it:

* multi-node: two torchrun "nodes" on localhost (``NNODES=2``, ``NODE_RANK`` 0 / 1, one process
  each) run the same short SFT + CARFT job as one node with two processes, and agree with it;
* preemption: SIGTERM to the launcher in the middle of an RL step (2 ranks): the workers finish
  the step, save a checkpoint and exit 0 with one line saying how to resume; the resumed run's
  metrics equal the uninterrupted run's exactly;
* an error found inside the workers is one line and exit 2, without torchrun's ChildFailedError.

The uninterrupted single-node run is launched once and shared by the checks.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.trainer.test_e2e import TINY, rows, strip_time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = TINY + ["sft.max_steps=2", "ppo.max_steps=4", "checkpoint.save_every=0", "contrastive.signal=both",
              "logging.eval_every=2"]


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: the CPU path uses the references
    return env


def _launch_cmd(out, *extra):
    """``launch CONFIG overrides`` of examples/_launch.sh, as every example script calls it."""
    args = " ".join(f"'{a}'" for a in [*JOB, f"out_dir={out}", *extra])
    return ["bash", "-c", f"source examples/_launch.sh && launch examples/configs/quickstart.yaml {args}"]


def _start(out, *extra, **env):
    return subprocess.Popen(_launch_cmd(out, *extra), cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # stop it the way a user would, so no worker is left behind
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the launch did not end within {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    """The uninterrupted job: one node, two processes (DP = 2)."""
    out = tmp_path_factory.mktemp("single") / "run"
    rc, log = _finish(_start(out, NPROC="2"))
    assert rc == 0, log[-6000:]
    return out, log


def test_two_nodes_on_localhost_agree_with_one_node(single_node, tmp_path):
    ref_out, ref_log = single_node
    out = tmp_path / "two_nodes"
    port = str(_free_port())
    nodes = [_start(out, NPROC="1", NNODES="2", NODE_RANK=str(k), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for k in (0, 1)]
    results = [_finish(p) for p in nodes]
    for k, (rc, log) in enumerate(results):
        assert rc == 0, f"node {k}:\n{log[-6000:]}"
    assert "x 2 node(s)" in results[0][1] and "world 2 = tp 1 x dp 2" in results[0][1]
    assert "results: " in results[0][1] and "results: " not in results[1][1]  # rank 0 lives on node 0
    for stage in ("sft", "carft"):
        got, ref = rows(str(out), stage), rows(str(ref_out), stage)
        assert [r["step"] for r in got] == [r["step"] for r in ref] and got
        for g, r in zip(got, ref):
            g, r = strip_time(g), strip_time(r)
            assert set(g) == set(r)
            for k in r:  # the same ranks and collectives: equal to fp32 rounding (in practice exactly)
                if isinstance(r[k], float):
                    assert g[k] == pytest.approx(r[k], rel=1e-5, abs=1e-7), (stage, g["step"], k)
                else:
                    assert g[k] == r[k], (stage, g["step"], k)
    res = [json.loads(line.split("results: ", 1)[1]) for line in results[0][1].splitlines() if "results: " in line][0]
    ref_res = [json.loads(line.split("results: ", 1)[1]) for line in ref_log.splitlines() if "results: " in line][0]
    assert res["carft_accuracy"] == ref_res["carft_accuracy"]


def test_sigterm_mid_step_saves_exits_0_and_resumes_exactly(single_node, tmp_path):
    ref_out, _ = single_node
    out = tmp_path / "preempted"
    proc = _start(out, NPROC="2")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # wait for RL step 1: step 2 is then running
        if metrics.exists() and any(json.loads(x).get("stage") == "carft" and "loss" in json.loads(x)
                                    for x in metrics.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before RL step 1 was logged"
    proc.send_signal(signal.SIGTERM)  # to the launcher (torchrun's agent), as Slurm or `kill` would
    rc, log = _finish(proc)
    assert rc == 0, log[-6000:]
    assert "Traceback" not in log and "SignalException" not in log, log[-6000:]
    lines = [x for x in log.splitlines() if "stopped by SIGTERM" in x]
    assert len(lines) == 1, log[-4000:]  # one line, from rank 0
    line = lines[0]
    assert "To resume, run the same command again" in line
    ckpt = line.split("checkpoint saved: ", 1)[1].split(". To resume", 1)[0]
    step = int(line.split("after RL step ", 1)[1].split(" ", 1)[0])
    assert 2 <= step < 4 and os.path.exists(os.path.join(ckpt, "COMPLETE")), line
    assert not (out / "results.json").exists()
    # The same command again resumes from that checkpoint and ends where the uninterrupted run did.
    rc, log = _finish(_start(out, NPROC="2"))
    assert rc == 0, log[-6000:]
    assert f"resuming from {ckpt} (carft step {step})" in log
    for stage in ("sft", "carft"):
        assert [strip_time(r) for r in rows(str(out), stage)] == [strip_time(r) for r in rows(str(ref_out), stage)]
    hist = sorted(os.listdir(out / "config_history"))
    assert len(hist) == 2 and "resumed from" in (out / "config_history" / hist[1]).read_text().splitlines()[0]


def test_an_error_inside_the_workers_is_one_line_without_torchrun_report(tmp_path):
    # Passes the launcher's checks (they do not know the world size) and fails in every worker:
    # 3 sequences do not split over 2 data-parallel ranks.
    rc, log = _finish(_start(tmp_path / "bad", "sft.global_batch_size=3", "sft.micro_batch_size=1", NPROC="2"))
    assert rc == 2, log[-6000:]
    errors = [x for x in log.splitlines() if x.startswith("error: ")]
    assert errors == ["error: config field 'sft.global_batch_size' = 3: must be a multiple of the data-parallel "
                      "size 2 (world 2 / tp 1)"], log[-4000:]
    assert "ChildFailedError" not in log and "Traceback" not in log, log[-6000:]
    assert not (tmp_path / "bad" / "config.yaml").exists()  # a failed launch leaves no record
