"""The python sandbox: correct programs, order, timeouts, and hostile programs (each scores None,
leaves the host untouched, and the pool keeps working with the same workers)."""

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from carft_mega.reward import Sandbox, default_sandbox, run_programs, set_default_sandbox

SECRET_VAR, SECRET = "CARFT_TEST_SECRET", "31337"
TIMEOUT = 1.0  # what the timeout tests use
PATIENT = 20.0  # the pool's default: programs that must finish do, even at load 25 on 2 cores


@pytest.fixture(scope="module")
def sb():
    os.environ[SECRET_VAR] = SECRET  # the workers must not see the trainer's environment
    try:
        with Sandbox(workers=2, timeout=PATIENT, cpu_seconds=1, memory_mb=256) as pool:
            yield pool
    finally:
        os.environ.pop(SECRET_VAR, None)


def prog(body, imports=""):
    lines = body.strip("\n").split("\n")
    return imports + "def solution():\n" + "\n".join("    " + ln for ln in lines) + "\n"


def _healthy(sb, pids):
    a, b = random.randint(0, 99), random.randint(0, 99)
    assert sb.run_programs([prog(f"return {a} * {b}")]) == [float(a * b)]
    assert sb.worker_pids == pids


def test_correct_programs_and_order(sb):
    rng = random.Random(0)
    programs, expected = [], []
    for i in range(40):
        a, b, c = rng.randint(-50, 50), rng.randint(1, 50), rng.randint(0, 9)
        kind = i % 4
        if kind == 0:
            programs.append(prog(f"x = {a}\ny = x * {b}\nreturn y + {c}"))
            expected.append(float(a * b + c))
        elif kind == 1:
            programs.append(prog(f"return math.floor({a} / {b})"))  # math is available without import
            expected.append(float(a // b))
        elif kind == 2:
            programs.append(prog(f"return Fraction({a}, {b})", "from fractions import Fraction\n"))
            expected.append(a / b)
        else:  # finishes in reverse order of submission
            programs.append(prog(f"time.sleep({0.002 * (40 - i)})\nreturn {i}", "import time\n"))
            expected.append(float(i))
    results = sb.run_programs(programs)
    assert results == pytest.approx(expected)


def test_non_numbers_and_exceptions(sb):
    programs = [prog('return "5"'), prog("return True"), prog("return None"), prog("return [1]"),
                prog('return float("nan")'), prog('return float("inf")'), prog("return 1j"),
                prog("return 10 ** 400"), prog("return 1 / 0"), prog("raise SystemExit(0)"),
                "x = 1\n", "def solution(:\n", prog("return undefined_name"), prog("return 7")]
    res = sb.run_programs_detailed(programs)
    assert [r.value for r in res] == [None] * 13 + [7.0]
    assert "ZeroDivisionError" in res[8].detail and "no solution()" in res[10].detail


def test_timeouts(sb):
    pids = sb.worker_pids
    hostile = [prog("while True:\n    pass"), prog("time.sleep(60)", "import time\n"),
               prog('while True:\n    print("x" * 100000)'), prog("return 10 ** 10 ** 10")]
    t0 = time.monotonic()
    res = sb.run_programs_detailed(hostile + [prog("return 1")], timeout=TIMEOUT)
    wall = time.monotonic() - t0
    assert [r.value for r in res] == [None] * 4 + [1.0]
    assert res[0].status in ("timeout", "crashed") and res[1].status == "timeout"
    # generous margins: the box may be busy; what matters is that nothing runs for its full 60 s
    assert all(r.seconds <= TIMEOUT + 1.0 for r in res)
    assert wall < 2 * TIMEOUT + 4.0  # two workers, four long programs
    r = sb.run_programs_detailed([prog("time.sleep(60)", "import time\n")], timeout=0.3)[0]
    assert r.value is None and r.status == "timeout" and r.seconds < 1.5
    _healthy(sb, pids)


def test_fork_bomb_and_processes(sb, tmp_path):
    pids = sb.worker_pids
    marker = f"/tmp/carft_sandbox_test_{uuid.uuid4().hex}"
    programs = [
        prog("while True:\n    os.fork()", "import os\n"),
        prog("import subprocess\nsubprocess.run(['true'])\nreturn 1"),
        prog(f"os.system('touch {marker}')\nreturn 1", "import os\n"),
        prog(f"os.execv('/bin/touch', ['touch', '{marker}'])", "import os\n"),
        prog(f"os.posix_spawn('/bin/touch', ['touch', '{marker}'], {{}})\nreturn 1", "import os\n"),
        prog("import _posixsubprocess\nreturn 1"),
        prog("import threading\nt = threading.Thread(target=print)\nt.start()\nreturn 1"),
        prog("import ctypes\nreturn ctypes.CDLL(None).getpid()"),
    ]
    assert sb.run_programs(programs) == [None] * len(programs)
    time.sleep(0.1)
    assert not os.path.exists(marker)
    _healthy(sb, pids)


def test_memory_bomb(sb):
    pids = sb.worker_pids
    programs = [prog("x = bytearray(10 ** 10)\nreturn 1"),
                prog('xs = []\nwhile True:\n    xs.append(" " * 10 ** 7)'),
                prog("return len([0] * 10 ** 9)")]
    assert sb.run_programs(programs) == [None] * 3
    _healthy(sb, pids)


def test_filesystem(sb, tmp_path):
    """A program writes only its own fresh /tmp (a tmpfs of its own, also its working directory):
    never the trainer's files, never the host's /tmp, and nothing it writes survives it."""
    pids = sb.worker_pids
    target = tmp_path / "outside.txt"
    name = f"carft_sandbox_test_{uuid.uuid4().hex}"
    programs = [
        prog(f"open({str(target)!r}, 'w').write('x')\nreturn 1"),
        prog(f"open('/tmp/{name}', 'w').write('x')\nreturn 1"),  # its own /tmp: allowed
        prog(f"open('../../../../../../tmp/{name}', 'w').write('x')\nreturn 1"),  # ".." is refused
        prog(f"os.mkdir('/tmp/{name}')\nreturn float(os.path.isdir('/tmp/{name}'))", "import os\n"),
        prog(f"fd = os.open('/tmp/{name}', os.O_CREAT | os.O_WRONLY)\nreturn 1", "import os\n"),
        prog(f"os.symlink('/tmp', 'link')\nopen('link/{name}', 'w')\nreturn 1", "import os\n"),
        prog(f"os.rename('x', '/tmp/{name}')\nreturn 1", "import os\n"),
        prog("return float(len(open('/etc/passwd').read()))"),
        prog("return float(len(os.listdir('/')))", "import os\n"),
        prog("os.chdir('/')\nreturn 1", "import os\n"),
        # inside its own directory everything works, and the directory is fresh for every program
        prog("import os\nassert os.listdir('.') == []\nopen('a.txt', 'w').write('41')\n"
             "os.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\nreturn float(open('d/b.txt').read()) + 1"),
        prog(f"import os\nreturn float(len(os.listdir('.')) + os.path.exists('/tmp/{name}'))"),
    ]
    res = sb.run_programs(programs)
    assert res == [None, 1.0, None, 1.0] + [None] * 6 + [42.0, 0.0]
    assert not target.exists()
    assert not os.path.exists(f"/tmp/{name}")
    big = sb.run_programs_detailed([prog("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10 ** 6)")])[0]
    assert big.value is None and big.status in ("error", "crashed")  # RLIMIT_FSIZE
    _healthy(sb, pids)


def test_network(sb):
    pids = sb.worker_pids
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        programs = [
            prog(f"s = socket.socket()\ns.connect(('127.0.0.1', {port}))\nreturn 1", "import socket\n"),
            prog(f"s = _socket.socket()\ns.connect(('127.0.0.1', {port}))\nreturn 1", "import _socket\n"),
            prog("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1')\nreturn 1"),
        ]
        assert sb.run_programs(programs) == [None] * 3
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()
    _healthy(sb, pids)


def test_environment_is_not_readable(sb):
    pids = sb.worker_pids
    assert os.environ[SECRET_VAR] == SECRET
    programs = [
        prog(f"return float(os.environ[{SECRET_VAR!r}])", "import os\n"),
        prog(f"return float(os.getenv({SECRET_VAR!r}, 'none'))", "import os\n"),
        prog("for pid in os.listdir('/proc'):\n"
             "    try:\n"
             f"        env = open('/proc/' + pid + '/environ', 'rb').read()\n"
             "    except OSError:\n"
             "        continue\n"
             f"    if b'{SECRET_VAR}=' in env:\n"
             f"        return float(env.split(b'{SECRET_VAR}=')[1].split(b'\\0')[0])", "import os\n"),
        prog(f"return float(open('/proc/{os.getpid()}/environ', 'rb').read().split(b'{SECRET_VAR}=')[1][:5])"),
        prog("return float(len(os.environ))", "import os\n"),  # an empty environment: allowed, 0
    ]
    assert sb.run_programs(programs) == [None, None, None, None, 0.0]
    _healthy(sb, pids)


def test_killing_and_exiting(sb):
    pids = sb.worker_pids
    programs = [
        prog("os.kill(os.getpid(), 9)", "import os\n"),
        prog("os.kill(os.getppid(), 9)", "import os\n"),
        prog("os.killpg(0, 9)", "import os\n"),
        prog("import signal\nsignal.pthread_kill(0, 9)"),
        prog("os._exit(0)", "import os\n"),
        prog("os.abort()", "import os\n"),
        prog("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nreturn f(0)"),
    ]
    assert sb.run_programs(programs) == [None] * len(programs)
    _healthy(sb, pids)


def test_audit_hook_cannot_be_rewired(sb):
    pids = sb.worker_pids
    programs = [
        # CPython silently refuses the new hook when ours objects, so the program sees no events
        prog("import sys\nseen = []\nsys.addaudithook(lambda e, a: seen.append(e))\nopen('f', 'w')\n"
             "return 1 / len(seen)"),
        prog("import gc\nreturn float(len(gc.get_objects()))"),
        prog("import sys\nsys.settrace(lambda *a: None)\nreturn 1"),
        prog("import os\nos.path.realpath = lambda p: '.'\nopen('/etc/x', 'w')\nreturn 1"),
        # a program's own functions are its own (namedtuple sets __new__.__defaults__)
        prog("def f(x=1):\n    return x\nf.__defaults__ = (5,)\nreturn f()"),
    ]
    assert sb.run_programs(programs) == [None] * (len(programs) - 1) + [5.0]
    _healthy(sb, pids)


def test_dead_worker_is_replaced(sb):
    pids = sb.worker_pids
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.05)
    res = sb.run_programs_detailed([prog(f"return {i}") for i in range(6)])
    assert [r.value for r in res] == [float(i) for i in range(6)], res
    new = sb.worker_pids
    assert new[0] != pids[0] and new[1] == pids[1] and sb.replaced >= 1
    _healthy(sb, new)


def _orphans():
    """Sandbox children whose worker is gone (re-parented to init)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"_sandbox_worker.py" in cmd and ppid == 1:
            found.append(int(pid))
    return found


def test_worker_killed_mid_job(sb):
    """A worker killed from outside while a program runs: its child dies with it (no orphan), the
    program is retried once on a fresh worker, and the pool carries on."""
    pids = sb.worker_pids
    killer = threading.Timer(0.3, lambda: [os.kill(p, signal.SIGKILL) for p in pids])
    killer.start()
    try:  # (program 0 runs 2 s: even on a busy box the killer fires while both workers are busy)
        res = sb.run_programs_detailed([prog("time.sleep(2.0)\nreturn 5", "import time\n"),
                                        prog("time.sleep(30)\nreturn 6", "import time\n")], timeout=5.0)
    finally:
        killer.join()
    assert res[0].value == 5.0 and res[1].value is None and res[1].status == "timeout"  # the retry timed out
    new = sb.worker_pids
    assert not set(new) & set(pids), (pids, new, res)
    time.sleep(0.2)
    assert _orphans() == []
    _healthy(sb, new)


def test_workers_end_when_the_trainer_is_killed():
    """A trainer killed with SIGKILL (a scheduler's preemption) leaves nothing behind: the server sees
    EOF on its stdin once the running program's timeout has passed, and the worker ends with it."""
    script = ("import sys, time\n"
              "from carft_mega.reward.sandbox import Sandbox\n"
              "sb = Sandbox(workers=1, timeout=2.0)\n"
              "print(' '.join(map(str, sb.worker_pids)), flush=True)\n"
              "sb.run_programs(['import time\\ndef solution():\\n    time.sleep(60)\\n'])\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert pids
        with open(f"/proc/{pids[0]}/task/{pids[0]}/children") as f:
            pids += [int(p) for p in f.read().split()]  # the server
        time.sleep(0.5)  # the program is running
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], pids
    finally:
        trainer.kill()
        trainer.wait()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_rejected_inputs(sb):
    res = sb.run_programs_detailed([b"def solution(): return 1", "#" * (sb.max_program_chars + 1), prog("return 2")])
    assert [r.status for r in res] == ["rejected", "rejected", "ok"] and res[2].value == 2.0
    assert sb.run_programs([]) == []
    with pytest.raises(ValueError, match="timeout"):
        sb.run_programs([prog("return 1")], timeout=0)


def test_layers_active(sb):
    layers = sb.layers
    for name in ("audit_hook", "rlimits", "process_group", "minimal_env", "mountns", "pidns", "netns", "ipcns",
                 "minimal_root", "read_only_root", "fresh_tmpfs", "seccomp", "no_new_privs"):
        assert layers[name], (name, layers)
    assert layers["userns"] == (os.geteuid() != 0) and not layers["server_has_ctypes"]
    if os.geteuid() == 0:
        assert layers["drop_privileges"] and layers["uid"] != 0
    assert sb.run_programs([prog("return float(os.getuid())", "import os\n")]) == [float(layers["uid"])]
    print("sandbox layers:", layers)


def test_module_level_pool_is_shared_and_lazy():
    try:
        set_default_sandbox(None)
        assert run_programs([prog("return 3")], timeout=5) == [3.0]
        pool = default_sandbox()
        pids = pool.worker_pids
        assert run_programs([prog("return 4"), prog("return 1/0")]) == [4.0, None]
        assert default_sandbox() is pool and pool.worker_pids == pids
    finally:
        default_sandbox().close()
        set_default_sandbox(None)


def test_closed_pool_and_arguments():
    pool = Sandbox(workers=1, timeout=1)
    pids = pool.worker_pids
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run_programs([prog("return 1")])
    time.sleep(0.1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)
    with pytest.raises(ValueError, match="memory_mb"):
        Sandbox(memory_mb=8)


def test_from_config():
    from carft_mega.config import RewardConfig

    cfg = RewardConfig(sandbox_workers=1, sandbox_timeout=2.5, sandbox_cpu_seconds=2, sandbox_memory_mb=300)
    with Sandbox.from_config(cfg) as pool:
        assert len(pool.worker_pids) == 1 and pool.timeout == 2.5
        assert pool.run_programs([prog("return 2 ** 10")]) == [1024.0]


def test_os_layers_hold_when_the_hook_is_bypassed(tmp_path):
    """With the hook off altogether: no fresh posix (``_imp.create_builtin`` is gone, so fork() cannot
    come back), and a thread, the one process-like thing left, fails on RLIMIT_NPROC=0."""
    fresh_posix = ("import sys, _imp\n"
                   "fib = sys.modules['_frozen_importlib']\n"
                   "posix = _imp.create_builtin(fib.spec_from_loader('posix', fib.BuiltinImporter))\n"
                   "def solution():\n"
                   "    return float(posix.fork())\n")
    thread = prog("import _thread\n_thread.start_new_thread(print, ())\nreturn 1")
    with Sandbox(workers=1, timeout=2, audit_hook=False) as pool:
        res = pool.run_programs_detailed([fresh_posix, thread])
    assert [r.value for r in res] == [None, None]
    assert "create_builtin" in res[0].detail, res[0]
    assert "can't start new thread" in res[1].detail, res[1]  # EAGAIN from clone()
