"""The prepared GPU run (benchmarks/gpu_check.py), checked without a GPU, in seconds: the plan's budget
arithmetic, the scheduling rule, and the whole flow in dry-run mode (fake steps, budgets scaled down 50
times): at most 8 files in $OUT, the summary written and printed last, the tarball's contents, timeouts,
failures, skipped dependants, the deadline, and a run killed half-way still leaving what finished.
The commands themselves are checked in tests/test_gpu_check_commands.py.
"""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check as gc  # noqa: E402

SCALE = 0.02  # dry runs: 540 s of budget become 10.8 s, the fakes take a tenth of their budgets
SHA = "cafe1234"


def _dry_run(tmp_path, *args, fraction=0.1, wait=True):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), CARFT_GIT_SHA=SHA)
    env.pop("GPU_CHECK_WORK", None)
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--time-scale", str(SCALE),
           "--fake-fraction", str(fraction), "--work", str(work), *args]
    env["PYTHON"] = sys.executable
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True), out, work
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return proc, out, work, time.monotonic() - t0


def _kill_session(sid: int) -> None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _out_files(out: Path):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= gc.MAX_OUT_FILES, files
    for p in files:  # the device tool returns files at most 2 folders down, with plain names
        assert len(p.relative_to(out).parts) <= 3 and all(c.isalnum() or c in "._-" for c in p.name), p
    return {str(p.relative_to(out)) for p in files}


def _tar_members(out: Path):
    with tarfile.open(out / gc.TARBALL) as tar:
        names = set(tar.getnames())
        status = json.load(tar.extractfile("gpu_check/status.json"))
    return names, status


# ---------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("part", [1, 2])
def test_budget_arithmetic(part, tmp_path):
    """Every step taking its whole budget still ends inside BUDGET_S (less the reserve for the final
    files), which leaves a margin of the 600 s call; the slow steps overlap."""
    steps = gc.plan(part, tmp_path)
    times = gc.simulate(steps)
    end = max(e for _, e in times.values())
    assert end + gc.REPORT_RESERVE_S <= gc.DEFAULT_BUDGET_S, gc.format_plan(steps, gc.DEFAULT_BUDGET_S)
    assert gc.DEFAULT_BUDGET_S <= gc.CALL_LIMIT_S - 45
    assert end < sum(s.budget_s for s in steps)  # some steps run in parallel
    assert all(s.budget_s >= gc.MIN_START_S for s in steps)
    assert len(gc.OUT_FILES) <= gc.MAX_OUT_FILES
    if part == 1:  # the Triton tests run while the extension builds, the timed steps alone
        (b0, b1), (t0, _) = times["build"], times["test_triton"]
        assert t0 < b1 and b0 < t0 + 1
        for s in steps:
            if s.exclusive:
                a, b = times[s.name]
                assert not any(n != s.name and x < b and a < y for n, (x, y) in times.items()), s.name


def test_scheduling_rule():
    S = gc.Step
    steps = [S("a", 10, [], ""), S("b", 30, [], "", after=("a",)), S("c", 5, [], "", after=("a",)),
             S("x", 7, [], "", exclusive=True, after=("a",)), S("d", 1, [], "")]
    t = gc.simulate(steps)
    # b and c run together after a; the exclusive x waits for both and holds back d, which comes after it
    assert t == {"a": (0, 10), "b": (10, 40), "c": (10, 15), "x": (40, 47), "d": (47, 48)}
    with pytest.raises(ValueError, match="cannot proceed"):
        gc.simulate([S("y", 1, [], "", after=("missing",))])


def test_steps_subset_adds_what_they_need(tmp_path):
    steps = gc.select(["bench_lcs", "smollm2_shape"], tmp_path)
    assert [s.name for s in steps] == ["wheels", "env", "build", "bench_lcs", "smollm2_shape"]
    assert dict((s.name, s.after) for s in steps)["bench_lcs"] == ()  # tests not in this run: no wait
    assert dict((s.name, s.after) for s in steps)["smollm2_shape"] == ("build", "env")
    with pytest.raises(SystemExit, match="unknown step"):
        gc.select(["nope"], tmp_path)


# ---------------------------------------------------------------------------------------- dry runs


def test_dry_run_part1(tmp_path):
    proc, out, work, secs = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _out_files(out) == set(gc.OUT_FILES)
    summary = (out / gc.SUMMARY).read_text()
    assert (out / gc.SUMMARY).stat().st_mtime_ns >= (out / gc.TARBALL).stat().st_mtime_ns  # written last
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # and printed last
    assert f"commit {SHA}" in summary and "finished" in summary
    steps = gc.plan(1, work)
    for s in steps:
        assert any(line.split()[:2] == [s.name, "ok"] for line in summary.splitlines()), s.name
    names, status = _tar_members(out)
    want = {f"gpu_check/logs/{s.name}.log" for s in steps}
    want |= {f"gpu_check/results/{r}" for s in steps for r in s.results}
    want |= {"gpu_check/env.txt", "gpu_check/status.json", "gpu_check/summary.txt", "gpu_check/plan.txt"}
    assert want <= names, want - names
    assert status["commit"] == SHA and status["final"] and {r["state"] for r in status["steps"].values()} == {"ok"}
    # Wall time: the fakes take a tenth of their budgets; the schedule overlaps them as planned.
    worst = max(e for _, e in gc.simulate(steps).values()) * SCALE
    assert secs < worst + 30


def test_dry_run_part2_digests_the_trainer_metrics(tmp_path):
    proc, out, work, _ = _dry_run(tmp_path, "--part", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _out_files(out) == set(gc.OUT_FILES)
    names, status = _tar_members(out)
    assert {"gpu_check/results/quickstart_metrics.jsonl", "gpu_check/results/smollm2_shape_metrics.jsonl"} <= names
    summary = (out / gc.SUMMARY).read_text()
    assert "RESULT smollm2_shape carft (median of steps 2..3): mfu 0.25, step 2 s" in summary


def test_metrics_digest(tmp_path):
    m = tmp_path / "metrics.jsonl"
    rows = [{"stage": "sft", "step": i, "time/update": t, "sft/loss": 1.0} for i, t in enumerate([9.0, 1.0, 3.0], 1)]
    rows += [{"stage": "carft", "step": 1, "eval/accuracy": 0.5},  # an eval-only row: no timings
             {"stage": "carft", "step": 1, "time/rollout": 0.5, "perf/rollout_tokens_per_s": 1000.0}]
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert gc.metrics_digest(m, "qs") == ["RESULT qs sft (median of steps 2..3): update 2 s",
                                          "RESULT qs carft (one step): rollout_tokens_per_s 1000, rollout 0.5 s"]


def test_dry_run_failure_timeout_and_skips(tmp_path):
    proc, out, work, _ = _dry_run(tmp_path, "--fake-fail", "build", "--fake-overrun", "env")
    assert proc.returncode == 1
    _, status = _tar_members(out)
    st = {n: r["state"] for n, r in status["steps"].items()}
    assert st["build"] == "failed" and st["env"] == "timeout"
    assert status["steps"]["env"]["rc"] == 124
    assert st["test_ext"] == "skipped" and st["bench_lcs"] == "skipped"  # they need the extension
    assert st["test_triton"] == st["bench_advantages"] == st["bench_cot_head"] == "ok"  # they only wait
    summary = (out / gc.SUMMARY).read_text()
    assert "needs build" in summary and "--steps env" in summary
    assert _out_files(out) == set(gc.OUT_FILES)


def test_dry_run_deadline_leaves_steps_for_a_second_call(tmp_path):
    proc, out, work, secs = _dry_run(tmp_path, "--budget", "150", fraction=0.9)
    assert proc.returncode == 1
    assert secs < 150 * SCALE + 20
    _, status = _tar_members(out)
    late = [n for n, r in status["steps"].items() if r["state"] == "not reached"]
    assert late and "bench_cot_head" in late
    summary = (out / gc.SUMMARY).read_text()
    assert f"CARFT_GIT_SHA={SHA} bash benchmarks/gpu_check.sh --steps" in summary and "bench_cot_head" in summary


def test_killed_run_keeps_what_finished(tmp_path):
    """The device tool kills a command at its limit: the files in $OUT are those of the last finished step."""
    proc, out, work = _dry_run(tmp_path, "--fake-overrun", "bench_cot_head", fraction=0.1, wait=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (work / "logs" / "bench_cot_head.log").exists() and (out / gc.TARBALL).exists():
                names, status = _tar_members(out)
                if status["steps"]["bench_advantages"]["state"] == "ok":
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the dry run never reached bench_cot_head")
    finally:
        _kill_session(proc.pid)  # the driver and its steps (they share its session, each in its own group)
        proc.wait(timeout=30)
    files = _out_files(out)
    assert set(gc.OUT_FILES) <= files  # a half-written .part file may be there too, still <= 8 files
    names, status = _tar_members(out)
    assert not status["final"]
    assert "gpu_check/logs/bench_advantages.log" in names and "gpu_check/results/bench_advantages.csv" in names
    assert status["steps"]["bench_cot_head"]["state"] in ("running", "pending")
    summary = (out / gc.SUMMARY).read_text()
    assert "in progress" in summary and any(ln.split()[:2] == ["bench_lcs", "ok"] for ln in summary.splitlines())


def test_print_command_carries_the_commit(tmp_path):
    env = dict(os.environ, CARFT_GIT_SHA="0123abcd")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--print-command", "--part", "2"],
                         env=env, capture_output=True, text=True, timeout=60).stdout
    assert "CARFT_GIT_SHA=0123abcd bash benchmarks/gpu_check.sh --part 2" in out and "'.whl'" in out
    assert f"timeout_s={gc.CALL_LIMIT_S}" in out
