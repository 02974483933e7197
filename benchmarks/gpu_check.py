#!/usr/bin/env python3
"""The prepared GPU check: every check that needs a GPU, as one device call of at most 10 minutes.

Part 1 (the call to make first) installs the carried wheels, reports the environment, builds the CUDA
extension while the Triton op tests run, then runs the extension, model and trainer GPU tests, and the
three kernel benchmarks alone on the GPU. Part 2 (optional, a second call) times the trainer: a short
quick start (per-stage timings) and a SmolLM2-135M-shaped model built in code (rollout tokens/s, MFU),
plus more cot_head shapes. `--steps` runs named steps (and what they need) instead, e.g. the ones a
killed first call did not reach: its summary prints that command.

Limits it is built for (docs/benchmarks.md, "The prepared GPU run"): at most 8 files come back from
$OUT, so $OUT receives two: `gpu_check.tar.gz` (every log, CSV, JUnit XML, metrics file and the
environment report, rewritten after every step, so a killed call still returns what finished) and
`summary.txt` (rewritten after every step, printed last). Steps share one budget, BUDGET_S (default 540 s
of a 600 s call): a step starts only if enough of it is left, and its time limit never runs past it.
No .git travels, so the commit comes from CARFT_GIT_SHA (`--print-command` writes the call with it).

    python benchmarks/gpu_check.py --print-command        # here: the device call to make, commit filled in
    bash benchmarks/gpu_check.sh                          # there: part 1 (OUT set by the device tool)
    bash benchmarks/gpu_check.sh --part 2                 # there: the optional second call
    python benchmarks/gpu_check.py --list                 # the plan, its budgets and the worst-case timeline
    python benchmarks/gpu_check.py --dry-run --time-scale 0.01   # the whole flow with fake steps (CI)

Standard library only: it must run before anything is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALL_LIMIT_S = 600  # one device call (its timeout_s at most)
DEFAULT_BUDGET_S = 540  # all steps together; the rest of the call is margin
REPORT_RESERVE_S = 10  # kept free after the last step for the final tarball and summary
MIN_START_S = 20  # a step with less than this (or than a third of its budget) left is not started
KILL_GRACE_S = 10  # SIGINT (pytest then prints its summary), then SIGKILL this much later
MAX_OUT_FILES = 8  # what the device tool returns from $OUT
OUT_FILES = ("gpu_check.tar.gz", "summary.txt")  # everything this script writes to $OUT
TARBALL, SUMMARY = OUT_FILES
WHEEL_DIR = REPO / ".whl"  # carried: megatron-core (and the gpt2 tokenizer), see fetch_gpu_wheels.sh
TOKENIZER_DIR = WHEEL_DIR / "tokenizer_gpt2"

# SmolLM2-135M-Instruct's shape (shared/models/SOURCES.md): 30 layers, hidden 576, 9 heads / 3 KV heads,
# SwiGLU 1536, tied embeddings, rope theta 1e5. Built in code with random weights (the GGUF cannot travel).
SMOLLM2_SHAPE = ["model.source=tiny", "model.tiny.arch=llama", "model.tiny.hidden_size=576",
                 "model.tiny.num_layers=30", "model.tiny.num_heads=9", "model.tiny.num_kv_heads=3",
                 "model.tiny.ffn_hidden_size=1536", "model.tiny.tie_embeddings=true",
                 "model.tiny.rope_theta=100000", "model.tiny.max_position_embeddings=1024"]
TRAINER_QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
                 "checkpoint.resume=none", "checkpoint.save_every=0"]


@dataclasses.dataclass
class Step:
    """One command of the run.

    Attributes:
        name: short id (log file name, --steps).
        budget_s: its time limit when the run budget allows; the plan's arithmetic uses it as its duration.
        argv: the command, run in the repository root.
        what: one line for the summary.
        deps: steps that must have succeeded first (the step is skipped if one did not).
        after: steps that must have finished first, whatever their result (ordering only).
        exclusive: runs alone (timings): nothing else starts while it runs, and it starts on an idle GPU.
        env: extra environment variables.
        results: files it writes under the work folder's results/ (listed in the summary when present).
    """

    name: str
    budget_s: int
    argv: list[str]
    what: str
    deps: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    exclusive: bool = False
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    results: tuple[str, ...] = ()


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def plan(part: int, work: Path, py: str = sys.executable) -> list[Step]:
    """The steps of ``part`` (1 or 2), in priority order."""
    res = work / "results"
    xdist = ["-n", "6"] if _have("xdist") else []
    pytest = [py, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "--timeout=300"]
    pinned = {"CARFT_TRITON_AUTOTUNE": "0"}  # tests pin one config per kernel; benchmarks autotune
    wheels = sorted(glob.glob(str(WHEEL_DIR / "*.whl")))
    site = str(work / "site")
    install = ([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", site, *wheels] if wheels else
               [py, "-c", "import megatron.core; print('no .whl/ carried; megatron-core is already there')"])
    common = [
        Step("wheels", 30, install, "install the carried wheels (megatron-core) into the work folder"),
        Step("env", 45, [py, str(Path(__file__).resolve()), "--env-report", str(work / "env.txt")],
             "GPU, driver, versions, copy bandwidth and bf16 GEMM rate", after=("wheels",)),
        Step("build", 100, [py, "setup.py", "build_ext", "--build-lib", str(work / "ext"),
                            "--build-temp", str(work / "build")],
             "build carft_mega_cuda with its CUDA part (sm_90)", after=("wheels",),
             env={"CARFT_CUDA_ARCHS": "90", "MAX_JOBS": "16", "NVCC_THREADS": "4"}),
    ]
    if part == 1:
        return common + [
            Step("test_triton", 150,
                 pytest + xdist + ["--junitxml", str(res / "test_triton.xml"), "tests/ops/test_cot_head.py",
                                   "tests/ops/test_advantages.py", "tests/ops/test_cuda_compile.py",
                                   "tests/ops/test_triton_autotune_knob.py",
                                   "-k", "not compile_for_sm90 and not gloo"],
                 "Triton op tests on CUDA (gpu-marked and device-generic), nvcc checks", after=("env",),
                 env=pinned, results=("test_triton.xml",)),
            Step("test_ext", 140,
                 pytest + ["-rA"] + (["-n", "3", "--dist", "loadfile"] if xdist else []) +  # -rA: their prints
                 ["--junitxml", str(res / "test_ext.xml"), "-m", "gpu", "tests/ops/test_lcs.py",
                  "tests/models/test_mcore_gpu.py", "tests/trainer/test_gpu_kernels_step.py"],
                 "CUDA LCS vs the reference, bf16 Megatron policy, one CARFT step auto vs ref",
                 deps=("build",), after=("env",), env=pinned, results=("test_ext.xml",)),
            Step("bench_lcs", 40,
                 [py, "benchmarks/bench_lcs.py", "--no-ref", "--lengths", "512", "1024", "--gpu-lengths", "512",
                  "1024", "2048", "--csv", str(res / "bench_lcs.csv")],
                 "LCS at 64 x 512^2 / 1024^2 / 2048^2 (CUDA and the C++ path)", deps=("build",),
                 after=("test_triton", "test_ext"), exclusive=True, results=("bench_lcs.csv",)),
            Step("bench_advantages", 50,
                 [py, "benchmarks/bench_advantages.py", "--seq", "1024", "4096", "--dtype", "fp32",
                  "--sweep-block-t", "--csv", str(res / "bench_advantages.csv")],
                 "advantages at 64 x 1024 and 64 x 4096, block_t swept", after=("test_triton", "test_ext"),
                 exclusive=True, results=("bench_advantages.csv",)),
            Step("bench_cot_head", 150,
                 [py, "benchmarks/bench_cot_head.py", "--shapes", "1024x576,1024x4096",
                  "--csv", str(res / "bench_cot_head.csv")],
                 "cot_head fwd/bwd/fwd+bwd at N=64, T=1024, H=576/4096 bf16, autotuned",
                 after=("test_triton", "test_ext"), exclusive=True, results=("bench_cot_head.csv",)),
        ]
    if part == 2:
        tok = [f"model.tokenizer={TOKENIZER_DIR}"] if TOKENIZER_DIR.is_dir() else []
        return common + [
            Step("quickstart", 120,
                 [py, "-m", "carft_mega.train", "--config", "examples/configs/quickstart.yaml",
                  f"out_dir={work / 'quickstart'}", "sft.max_steps=60", "ppo.max_steps=8", "logging.eval_every=0",
                  *TRAINER_QUIET],
                 "the quick start, shortened (60 SFT + 8 RL steps): per-stage timings on the GPU",
                 after=("build", "env"), exclusive=True, results=("quickstart_metrics.jsonl",)),
            Step("smollm2_shape", 150,
                 [py, "-m", "carft_mega.train", f"out_dir={work / 'smollm2_shape'}", *SMOLLM2_SHAPE, *tok,
                  "data.dataset=synthetic", "data.synthetic_train_size=512", "data.synthetic_test_size=64",
                  "data.max_prompt_tokens=256", "data.max_length=512", "sft.enabled=false",
                  "ppo.max_steps=3", "ppo.rollout_batch_size=64", "ppo.micro_batch_size=16", "ppo.lr=1e-6",
                  "rollout.max_new_tokens=256", "rollout.eval_max_new_tokens=64", "rollout.eval_batch_size=64",
                  "logging.eval_every=0", *TRAINER_QUIET],
                 "SmolLM2-135M shape, random weights: rollout tokens/s, per-stage times, MFU (3 RL steps)",
                 after=("build", "env", "quickstart"), exclusive=True, results=("smollm2_shape_metrics.jsonl",)),
            Step("bench_cot_head_more", 100,
                 [py, "benchmarks/bench_cot_head.py", "--shapes", "1024x896,256x4096,2048x4096",
                  "--csv", str(res / "bench_cot_head_more.csv")],
                 "cot_head at H=896 (T=1024) and T=256/2048 (H=4096)", after=("smollm2_shape",),
                 exclusive=True, results=("bench_cot_head_more.csv",)),
        ]
    raise ValueError(f"part must be 1 or 2, got {part}")


def by_name(parts=(1, 2), work: Path = Path("/tmp/gpu_check")) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    for p in parts:
        for s in plan(p, work):
            steps.setdefault(s.name, s)
    return steps


def select(names: list[str], work: Path) -> list[Step]:
    """The named steps of either part, plus the steps they need (deps, recursively), in plan order."""
    every = by_name(work=work)
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {unknown}; known: {sorted(every)}")
    want = set(names) | {"wheels", "env"}  # a fresh machine needs the wheels; the report is cheap
    todo = list(want)
    while todo:
        for d in every[todo.pop()].deps:
            if d not in want:
                want.add(d)
                todo.append(d)
    keep = [s for s in every.values() if s.name in want]
    for s in keep:  # ordering constraints on steps that are not part of this run do not apply
        s.after = tuple(a for a in s.after if a in want)
    return keep


# ------------------------------------------------------------------------------------------- scheduling


def startable(steps: list[Step], done: set[str], running: dict[str, object], started: set[str]) -> list[Step]:
    """Steps to start now, in plan order. A step waits for its deps and `after` steps; an exclusive step
    waits until nothing runs, and while it waits or runs no later step starts (so it is not starved)."""
    out: list[Step] = []
    busy = bool(running)
    for s in steps:
        if s.name in started or s.name in done:
            continue
        ready = all(d in done for d in (*s.deps, *s.after))
        if s.exclusive:
            if ready and not busy and not out:
                out.append(s)
            break  # nothing after a pending exclusive step starts before it
        if ready and not any(r.exclusive for r in running.values()):
            out.append(s)
            busy = True
    return out


def simulate(steps: list[Step], durations: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """(start, end) of every step if each takes ``durations[name]`` (default: its whole budget), under the
    scheduling rule of :func:`startable`. The budget arithmetic: the largest end must fit BUDGET_S."""
    dur = {s.name: float(s.budget_s) for s in steps}
    dur.update(durations or {})
    t, done, running, started, times = 0.0, set(), {}, set(), {}
    while len(done) < len(steps):
        for s in startable(steps, done, running, started):
            running[s.name], times[s.name] = s, (t, t + dur[s.name])
            started.add(s.name)
        if not running:
            raise ValueError(f"gpu_check plan cannot proceed: {sorted(set(x.name for x in steps) - done)} "
                             "wait on steps that are not in it")
        t = min(times[n][1] for n in running)
        for n in [n for n in running if times[n][1] <= t]:
            del running[n]
            done.add(n)
    return times


# ------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Result:
    state: str  # ok | failed | timeout | skipped | not reached | running | pending
    rc: int | None = None
    seconds: float = 0.0
    timeout_s: float = 0.0
    note: str = ""


def metrics_digest(path: Path, name: str) -> list[str]:
    """RESULT lines from a trainer's metrics.jsonl: per stage, the median of every ``time/*`` and ``perf/*``
    value over the steps after the first (compile and warm-up), and the number of steps."""
    import statistics

    by_stage: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if any(k.startswith("time/") for k in row):
            by_stage.setdefault(row.get("stage", "?"), []).append(row)
    out = []
    for stage, rows in by_stage.items():
        use = rows[1:] or rows
        keys = sorted({k for r in use for k in r if k.startswith(("time/", "perf/"))})
        vals = []
        for k in keys:
            xs = [r[k] for r in use if isinstance(r.get(k), (int, float))]
            if xs:
                v = statistics.median(xs)
                vals.append(f"{k.split('/', 1)[1]} {v:.4g}{' s' if k.startswith('time/') else ''}")
        steps = f"median of steps 2..{len(rows)}" if len(rows) > 1 else "one step"
        out.append(f"RESULT {name} {stage} ({steps}): " + ", ".join(vals))
    return out


def commit() -> str:
    from _common import git_sha  # this script's folder is on sys.path (run as a script, or by the tests)

    sha = git_sha()
    return "unknown (set CARFT_GIT_SHA: no .git travels)" if sha == "unknown" else sha


_HIGHLIGHT = ("Traceback", "Error:", "MISSES", "meets", "accuracy after", "Killed", "out of memory")
_PYTEST_LAST = re.compile(r"^=+ .*\b(passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s")


def highlights(log: Path, limit: int = 12) -> list[str]:
    """The lines of a log worth a look in the summary: results, failures, pytest's last line."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith(("$ ", "# step "))]  # not the lines this script wrote
    except OSError:
        return []
    picked = [ln for ln in lines if ln.startswith(("RESULT", "FAILED", "ERROR ", "SKIPPED", "carft_mega setup.py"))
              or "MISMATCH" in ln]
    tail = [ln for ln in lines[-40:] if (any(k in ln for k in _HIGHLIGHT) or _PYTEST_LAST.match(ln))
            and ln not in picked]
    out = picked[:limit] + tail[-3:]
    if not out and lines:
        out = lines[-2:]
    return [ln[:200] for ln in out]


class Runner:
    def __init__(self, steps: list[Step], out: Path, work: Path, budget_s: float, part: str,
                 time_scale: float = 1.0, poll_s: float = 0.5):
        self.steps, self.out, self.work, self.part = steps, out, work, part
        self.budget_s, self.scale, self.poll_s = budget_s, time_scale, poll_s
        self.results = {s.name: Result("pending") for s in steps}
        self.t0 = time.monotonic()
        self.sha = commit()
        self.logs = work / "logs"

    # -- output files
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def summary_text(self, final: bool) -> str:
        env = self.work / "env.txt"
        lines = [f"carft_mega GPU check, part {self.part}, commit {self.sha}, "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
                 f"budget {self.budget_s:.0f} s of a {CALL_LIMIT_S * self.scale:.0f} s call; "
                 f"elapsed {self.elapsed():.0f} s; {'finished' if final else 'in progress'}"]
        if env.exists():
            lines += ["  " + ln for ln in env.read_text(errors="replace").splitlines()
                      if ln.startswith(("gpu:", "driver:", "versions:", "cuda:", "copy:", "gemm:"))]
        lines.append(f"{'step':20s} {'state':12s} {'rc':>4s} {'time/limit':>12s}  what")
        for s in self.steps:
            r = self.results[s.name]
            rc = "" if r.rc is None else str(r.rc)
            tl = f"{r.seconds:.0f}/{r.timeout_s:.0f} s" if r.state not in ("pending", "skipped", "not reached") \
                else f"-/{s.budget_s * self.scale:.0f} s"
            note = f" [{r.note}]" if r.note else ""
            lines.append(f"{s.name:20s} {r.state:12s} {rc:>4s} {tl:>12s}  {s.what}{note}")
        for s in self.steps:
            r = self.results[s.name]
            if r.state in ("pending", "skipped", "not reached"):
                continue
            hl = highlights(self.logs / f"{s.name}.log")
            if hl:
                lines.append(f"-- {s.name}")
                lines += ["   " + ln for ln in hl]
        left = [s.name for s in self.steps if self.results[s.name].state in ("not reached", "timeout", "pending")]
        if left and final:
            lines.append(f"not finished: {', '.join(left)}. Second call: CARFT_GIT_SHA={self.sha.split()[0]} "
                         f"bash benchmarks/gpu_check.sh --steps {','.join(left)}")
        lines.append(f"all files: {TARBALL} (logs/, results/, env.txt, status.json)")
        return "\n".join(lines) + "\n"

    def write_outputs(self, final: bool = False) -> str:
        """Rewrite the tarball, then the summary (each through a temporary name and a rename)."""
        text = self.summary_text(final)
        (self.work / SUMMARY).write_text(text)
        status = {"part": self.part, "commit": self.sha, "budget_s": self.budget_s, "elapsed_s": self.elapsed(),
                  "final": final, "steps": {n: dataclasses.asdict(r) for n, r in self.results.items()}}
        (self.work / "status.json").write_text(json.dumps(status, indent=1))
        tmp = self.out / (TARBALL + ".part")
        with tarfile.open(tmp, "w:gz") as tar:
            for sub in ("env.txt", "status.json", SUMMARY, "plan.txt", "logs", "results"):
                p = self.work / sub
                if p.exists():
                    tar.add(p, arcname=f"gpu_check/{sub}")
        os.replace(tmp, self.out / TARBALL)
        tmp = self.out / (SUMMARY + ".part")
        tmp.write_text(text)
        os.replace(tmp, self.out / SUMMARY)
        return text

    # -- processes
    def env_for(self, step: Step) -> dict[str, str]:
        env = dict(os.environ)
        # The extension built by the `build` step first: an older build in the checkout must not shadow it.
        paths = [str(self.work / "ext"), str(REPO), str(self.work / "site")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", CARFT_GIT_SHA=self.sha.split()[0],
                   GPU_CHECK_WORK=str(self.work))
        env.update(step.env)
        return env

    def start(self, step: Step, argv: list[str]):
        remaining = self.budget_s - REPORT_RESERVE_S * self.scale - self.elapsed()
        timeout = min(step.budget_s * self.scale, remaining)
        if timeout < max(MIN_START_S * self.scale, step.budget_s * self.scale / 3):
            self.results[step.name] = Result("not reached", note=f"{max(remaining, 0):.0f} s of the budget left")
            return None
        log = open(self.logs / f"{step.name}.log", "w")
        cmd = shlex.join(argv).replace("\n", "\\n")
        log.write(f"$ {cmd}\n# step {step.name}: limit {timeout:.0f} s, started at {self.elapsed():.0f} s of the run\n")
        log.flush()
        # Its own process group (to stop it with everything it started), in this session: the device tool
        # ends a command's session when it returns, but not processes that started a new one.
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env_for(step), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)
        self.results[step.name] = Result("running", timeout_s=timeout)
        return proc, log, time.monotonic(), timeout

    def finish(self, step: Step, handle, timed_out: bool) -> None:
        proc, log, t_start, timeout = handle
        rc = proc.returncode
        log.write(f"\n# step {step.name}: rc {rc}{' (time limit)' if timed_out else ''} after "
                  f"{time.monotonic() - t_start:.1f} s\n")
        log.close()
        state = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
        self.results[step.name] = Result(state, rc=124 if timed_out else rc, seconds=time.monotonic() - t_start,
                                         timeout_s=timeout)
        for src in step.results:  # the trainer writes metrics.jsonl in its out_dir: keep a copy and a digest
            if src.endswith("_metrics.jsonl"):
                m = self.work / src.removesuffix("_metrics.jsonl") / "metrics.jsonl"
                if m.exists():
                    shutil.copy2(m, self.work / "results" / src)
                    try:
                        digest = metrics_digest(m, step.name)
                    except (ValueError, OSError) as e:  # a half-written file from a killed run
                        digest = [f"RESULT {step.name}: metrics.jsonl unreadable ({e})"]
                    with open(self.logs / f"{step.name}.log", "a") as f:
                        f.write("\n".join(digest) + "\n")

    def stop(self, handle) -> None:
        proc = handle[0]
        for sig, wait in ((signal.SIGINT, KILL_GRACE_S * self.scale), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=max(wait, 0.5))
                return
            except subprocess.TimeoutExpired:
                continue

    def run(self, argv_of) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.work / "results").mkdir(parents=True, exist_ok=True)
        (self.work / "plan.txt").write_text(format_plan(self.steps, self.budget_s / max(self.scale, 1e-9)))
        self.write_outputs()
        running: dict[str, Step] = {}
        handles: dict[str, tuple] = {}
        done: set[str] = set()

        def on_signal(signum, _frame):  # the device tool's limit, or Ctrl-C: stop children, keep what finished
            for n in list(handles):
                self.stop(handles[n])
                self.results[n].state, self.results[n].note = "timeout", f"run stopped by signal {signum}"
            self.write_outputs(final=True)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while len(done) < len(self.steps):
            progressed = False
            for s in self.steps:  # skip what cannot run: a hard dependency did not succeed
                if s.name not in done and s.name not in running and any(
                        d in done and self.results[d].state != "ok" for d in s.deps):
                    bad = [d for d in s.deps if self.results[d].state != "ok"]
                    self.results[s.name] = Result("skipped", note=f"needs {', '.join(bad)}")
                    done.add(s.name)
                    progressed = True
            for s in startable(self.steps, done, running, set(running) | done):
                progressed = True
                h = self.start(s, argv_of(s))
                if h is None:  # too little of the budget left
                    done.add(s.name)
                    continue
                running[s.name], handles[s.name] = s, h
                print(f"[{self.elapsed():6.1f} s] start {s.name} (limit {h[3]:.1f} s)", flush=True)
            if not running:
                if progressed:
                    continue
                if len(done) < len(self.steps):  # the rest waits on steps that will never run
                    for s in self.steps:
                        if s.name not in done:
                            self.results[s.name] = Result("not reached", note="waits on a step that did not run")
                            done.add(s.name)
                break
            time.sleep(self.poll_s)
            for n in list(running):
                proc, _, t_start, timeout = handles[n]
                timed_out = proc.poll() is None and time.monotonic() - t_start > timeout
                if timed_out:
                    self.stop(handles[n])
                if proc.poll() is not None:
                    self.finish(running.pop(n), handles.pop(n), timed_out)
                    done.add(n)
                    r = self.results[n]
                    print(f"[{self.elapsed():6.1f} s] {n}: {r.state} (rc {r.rc}, {r.seconds:.1f} s)", flush=True)
                    self.write_outputs()
        text = self.write_outputs(final=True)
        print("=" * 100)
        print(text, end="", flush=True)
        return 0 if all(r.state == "ok" for r in self.results.values()) else 1


# ------------------------------------------------------------------------------------------- reports


def format_plan(steps: list[Step], budget_s: float) -> str:
    times = simulate(steps)
    end = max(e for _, e in times.values())
    lines = [f"{'step':20s} {'budget':>7s} {'worst start':>11s} {'worst end':>9s}  needs / after / exclusive"]
    for s in steps:
        a, b = times[s.name]
        lines.append(f"{s.name:20s} {s.budget_s:6d}s {a:10.0f}s {b:8.0f}s  "
                     f"{','.join(s.deps) or '-'} / {','.join(s.after) or '-'}{' / exclusive' if s.exclusive else ''}")
    lines.append(f"worst case (every step takes its whole budget): {end:.0f} s of a {budget_s:.0f} s budget "
                 f"and a {CALL_LIMIT_S} s call; {sum(s.budget_s for s in steps)} s of budgets in all")
    return "\n".join(lines) + "\n"


_ENV_PY = r"""
import importlib, json, os, platform, subprocess, sys, time
out = []
def cmd(c):
    try:
        return subprocess.run(c, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001 - a report, not a check
        return f"unavailable ({type(e).__name__})"
out.append("commit: " + os.environ.get("CARFT_GIT_SHA", "unknown"))
smi = cmd(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem",
           "--format=csv,noheader"])
out.append("driver: " + smi)
out.append("nvcc: " + (cmd(["nvcc", "--version"]).splitlines() or ["?"])[-1])
vers = []
for name in ("torch", "triton", "megatron.core", "transformers", "transformer_engine", "flash_attn", "numpy",
             "xdist"):
    try:
        vers.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        vers.append(f"{name} absent")
out.append(f"versions: python {platform.python_version()}, " + ", ".join(vers))
out.append(f"host: {platform.node()}, {os.cpu_count()} CPUs")
import torch
from torch.utils import cpp_extension as ce
home = ce.CUDA_HOME
ok = bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
out.append(f"cuda: torch CUDA {torch.version.cuda}; torch's CUDA_HOME {home} "
           f"({'has' if ok else 'LACKS'} include/cuda_runtime.h)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.append(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
               f"{p.total_memory / 2**30:.0f} GiB")
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(20):
        y.copy_(x)
    ev[1].record()
    torch.cuda.synchronize()
    ms = ev[0].elapsed_time(ev[1]) / 20
    out.append(f"copy: {2 * x.numel() / ms / 1e6:.0f} GB/s device-to-device (1 GiB, read + write)")
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ev[0].record()
    for _ in range(10):
        a @ b
    ev[1].record()
    torch.cuda.synchronize()
    ms = ev[0].elapsed_time(ev[1]) / 10
    out.append(f"gemm: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s bf16 8192^3 (random data)")
else:
    out.append("gpu: none visible to torch")
print("\n".join(out))
"""


def env_report(path: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", _ENV_PY], capture_output=True, text=True, timeout=120)
    text = proc.stdout + (f"\nstderr:\n{proc.stderr[-3000:]}" if proc.returncode else "")
    path.write_text(text)
    print(text)
    return proc.returncode


# The dry run's stand-in for a step: sh, not python, so that its start-up (milliseconds) stays small
# against budgets scaled down 100 times. $1 name, $2 seconds, $3 ok|fail|overrun, then result files.
_FAKE_SH = r"""
name=$1; secs=$2; mode=$3; shift 3
echo "dry run of step $name: $secs s, $mode"
sleep "$secs"
for r in "$@"; do
  case $r in
    *_metrics.jsonl)  # the trainer writes its metrics into its out_dir, named like the result
      d="$GPU_CHECK_WORK/${r%_metrics.jsonl}"; mkdir -p "$d"
      printf '{"stage": "carft", "step": %s, "time/step": 2.0, "perf/mfu": 0.25}\n' 1 2 3 > "$d/metrics.jsonl";;
    *) printf 'fake,header\n1,2\n' > "$GPU_CHECK_WORK/results/$r";;
  esac
done
if [ "$name" = env ]; then
  printf 'commit: %s\ngpu: dry run\nversions: none\n' "$CARFT_GIT_SHA" > "$GPU_CHECK_WORK/env.txt"
fi
echo "RESULT $name dry-run $mode"
case $name in test*) echo "== 3 passed, 1 skipped in 0.01s ==";; esac
[ "$mode" != fail ]
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--part", type=int, choices=(1, 2), default=int(os.environ.get("GPU_CHECK_PART", "1")))
    p.add_argument("--steps", default=os.environ.get("GPU_CHECK_STEPS", ""),
                   help="comma-separated steps of either part to run instead (their deps are added)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", DEFAULT_BUDGET_S)),
                   help="seconds for all steps (default 540 of a 600 s call)")
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "runs" / "gpu_check" / "out")))
    p.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"),
                   help="logs, build and results (not returned: packed into the tarball)")
    p.add_argument("--list", action="store_true", help="print the plan and its worst-case timeline, run nothing")
    p.add_argument("--print-command", action="store_true", help="print the device call for this checkout")
    p.add_argument("--env-report", metavar="FILE", help=argparse.SUPPRESS)
    g = p.add_argument_group("dry run (CI): the real flow with fake steps")
    g.add_argument("--dry-run", action="store_true", help="replace every command by a short fake one")
    g.add_argument("--time-scale", type=float, default=1.0, help="scale budgets and limits (dry run)")
    g.add_argument("--fake-fraction", type=float, default=0.25, help="fake step length / its budget")
    g.add_argument("--fake-fail", default="", help="comma-separated steps whose fake command fails")
    g.add_argument("--fake-overrun", default="", help="comma-separated steps whose fake command overruns")
    args = p.parse_args(argv)
    if args.env_report:
        return env_report(Path(args.env_report))

    work = Path(args.work).resolve()
    steps = select([s for s in args.steps.split(",") if s], work) if args.steps else plan(args.part, work)
    if args.list:
        print(format_plan(steps, args.budget), end="")
        return 0
    if args.print_command:
        sha = commit().split()[0]
        print(f"run(command='CARFT_GIT_SHA={sha} bash benchmarks/gpu_check.sh --part {args.part}', "
              f"carry=['.whl'], timeout_s={CALL_LIMIT_S})")
        return 0
    if args.dry_run and args.time_scale == 1.0:
        args.time_scale = 0.02
    scale = args.time_scale if args.dry_run else 1.0
    if work.exists():
        for sub in ("logs", "results"):
            shutil.rmtree(work / sub, ignore_errors=True)
        for f in ("env.txt", "status.json", SUMMARY):
            (work / f).unlink(missing_ok=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    fail, overrun = set(args.fake_fail.split(",")), set(args.fake_overrun.split(","))

    def argv_of(step: Step) -> list[str]:
        if not args.dry_run:
            return step.argv
        mode = "fail" if step.name in fail else ("overrun" if step.name in overrun else "ok")
        secs = step.budget_s * scale * (3.0 if mode == "overrun" else args.fake_fraction)
        return ["sh", "-c", _FAKE_SH, "fake", step.name, f"{secs:.3f}", mode, *step.results]

    part = args.steps and f"steps {args.steps}" or str(args.part)
    runner = Runner(steps, out, work, args.budget * scale, part, time_scale=scale,
                    poll_s=0.5 if scale >= 1 else 0.02)
    return runner.run(argv_of)


if __name__ == "__main__":
    sys.exit(main())
