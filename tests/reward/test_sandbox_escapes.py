"""Programs that get past the audit hook, or go around it: each scores None, and the trainer, its
files and the programs running next to it are unaffected.

The OS layers (PID and mount namespaces, read-only filesystem) need root; CI runs as root, so those
tests skip only when not root. Where the hook itself would stop a program before it reaches the OS,
the test turns the hook off (``audit_hook=False``) so that the OS layer is what is tested.
"""

import os
import subprocess
import sys
import time
import uuid

import pytest

from carft_mega.reward import Sandbox
from carft_mega.reward._sandbox_worker import DEFAULT_LAZY_PRELOAD, DEFAULT_PRELOAD

ROOT = os.geteuid() == 0 and sys.platform.startswith("linux")
needs_root = pytest.mark.skipif(not ROOT, reason="PID/mount namespaces and the read-only filesystem need root")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fresh instance of the builtin posix module: os.kill, os.setpgid ... are removed from os/posix in
# programs, but _imp.create_builtin raises no audit event, so a program gets them back this way.
FRESH_POSIX = ("import sys, _imp\n"
               "_fib = sys.modules['_frozen_importlib']\n"
               "posix = _imp.create_builtin(_fib.spec_from_loader('posix', _fib.BuiltinImporter))\n")


def prog(body, imports=""):
    lines = body.strip("\n").split("\n")
    return imports + "def solution():\n" + "\n".join("    " + ln for ln in lines) + "\n"


def _check_layers(pool):
    layers = pool.layers
    for name in ("netns", "mountns", "pidns", "read_only_fs", "private_tmp", "private_proc"):
        assert layers[name], (name, layers)


def test_hook_state_cannot_be_changed_from_a_traceback():
    """Reviewer's bypass: the hook's frame is in the traceback of a refused open(); its helpers kept
    their state in a mutable __kwdefaults__ dict (then "../" * 30 escaped the working directory). Now
    every default is in an immutable tuple."""
    up = "../" * 30
    program = prog(f"""
try:
    open('/etc/hostname')
except PermissionError as e:
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    loc = tb.tb_frame.f_locals
    for fn in (loc['_norm'], loc['_inside']):
        kw = fn.__kwdefaults__ or {{}}
        if '_cwd' in kw:
            kw['_cwd'] = kw['_cwd'] + '/x' * 40
        for cell in fn.__closure__ or ():
            try:
                cell.cell_contents = '/'
            except Exception:
                pass
return float(len(open({up!r} + 'etc/hostname').read()))
""")
    with Sandbox(workers=1, timeout=3) as pool:
        res = pool.run_programs_detailed([program, prog("return 6 * 7")])
    assert res[0].value is None and "sandbox:" in res[0].detail, res[0]
    assert res[1].value == 42.0


@needs_root
@pytest.mark.parametrize("drop", [True, False], ids=["nobody", "root_no_caps"])
def test_filesystem_is_read_only_without_the_hook(drop, tmp_path):
    """With the hook off, a program may only write its own directory (and, as root, the worker's
    private /tmp): the world-writable /run/lock, /var/tmp, /dev/shm, the repository and the host's
    /tmp stay untouched, and the trainer's /proc entries do not exist for it."""
    name = f"carft_escape_{uuid.uuid4().hex}"
    targets = [f"/run/lock/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.join(REPO, name),
               str(tmp_path / name), f"/{name}"]
    os.environ["CARFT_ESCAPE_SECRET"] = "31337"
    try:
        with Sandbox(workers=1, timeout=3, drop_privileges=drop, audit_hook=False) as pool:
            _check_layers(pool)
            programs = [prog(f"open({t!r}, 'w').write('x')\nreturn 1") for t in targets]
            programs += [
                prog(f"return float(open('/proc/{os.getpid()}/environ', 'rb').read().count(b'31337'))"),
                prog("return float(len([p for p in os.listdir('/proc') if p.isdigit()]) > 2)", "import os\n"),
                prog("import os\nopen('mine.txt', 'w').write('41')\nreturn float(open('mine.txt').read()) + 1"),
            ]
            res = pool.run_programs_detailed(programs)
            assert [r.value for r in res] == [None] * (len(targets) + 1) + [0.0, 42.0], res
            if drop:  # nobody cannot write the private /tmp either (root-owned 0755)
                assert pool.run_programs([prog(f"open('/tmp/{name}', 'w')\nreturn 1")]) == [None]
    finally:
        os.environ.pop("CARFT_ESCAPE_SECRET", None)
    for t in targets + [f"/tmp/{name}"]:
        assert not os.path.exists(t), t


def _killer(victim_pid):
    """Kill every pid it can see (pidfd and kill), then the victim by pid, then kill(-1)."""
    return prog(f"""
sig = _imp.create_builtin(_fib.spec_from_loader('_signal', _fib.BuiltinImporter))
me, hit = posix.getpid(), set()
for pid in list(range(1, 5000)) + [{victim_pid}, {os.getpid()}]:
    if pid == me:
        continue
    try:
        fd = posix.pidfd_open(pid)
    except OSError:
        continue
    try:
        sig.pidfd_send_signal(fd, 9)
        hit.add(pid)
    except OSError:
        pass
    posix.close(fd)
for pid in ({victim_pid}, {os.getpid()}, 1, -1):
    try:
        posix.kill(pid, 9)
        hit.add(pid)
    except OSError:
        pass
raise RuntimeError(f'signalled {{sorted(hit)}}')
""", FRESH_POSIX)


@needs_root
@pytest.mark.parametrize("drop", [True, False], ids=["nobody", "root_no_caps"])
def test_program_cannot_kill_other_programs_or_the_trainer(drop):
    """Reviewer's h3: pidfd_open + pidfd_send_signal raise no audit event. Each worker is pid 1 of
    its own PID namespace: a program sees its worker and itself only, so the program running on the
    other worker, a process of the trainer (same uid as root programs) and the workers all survive."""
    victim = subprocess.Popen(["sleep", "60"])
    try:
        with Sandbox(workers=2, timeout=5, drop_privileges=drop) as pool:
            _check_layers(pool)
            pids = pool.worker_pids
            slow = prog("time.sleep(1.0)\nreturn 42", "import time\n")
            res = pool.run_programs_detailed([slow, _killer(victim.pid)])
            assert res[0].value == 42.0 and res[0].status == "ok", res
            # As root (without capabilities) it may signal its worker, pid 1 of the namespace, which
            # ignores signals from inside it; as nobody not even that.
            assert res[1].value is None and res[1].detail in ("RuntimeError: signalled []",
                                                              "RuntimeError: signalled [1]"), res[1]
            assert victim.poll() is None
            assert pool.worker_pids == pids and pool.replaced == 0
            assert pool.run_programs([prog("return 7")]) == [7.0]
    finally:
        victim.kill()
        victim.wait()


def test_signal_functions_are_not_reachable():
    """Defence in depth (also without namespaces): no kill, pidfd or process-group functions in os,
    no signal module."""
    programs = [prog("return float(hasattr(os, n))", f"import os\nn = {n!r}\n")
                for n in ("kill", "killpg", "pidfd_open", "setpgid", "setsid", "fork")]
    programs += [prog("import signal\nreturn 1"), prog("import _signal\nreturn 1"),
                 prog("import sys\nreturn float('_signal' in sys.modules or 'signal' in sys.modules)"),
                 prog("import sys\nreturn float(hasattr(sys.modules['posix'], 'kill'))")]
    with Sandbox(workers=1, timeout=3) as pool:
        assert pool.run_programs(programs) == [0.0] * 6 + [None, None, 0.0, 0.0]


def test_program_that_leaves_its_process_group_is_killed_on_time():
    """Reviewer's h3: setpgid into the worker's group made killpg miss the program and the worker
    hang for timeout + 10 s. The worker now kills the program's pid directly (and, as pid 1, all of
    its namespace): a timeout as usual, the same workers, and the next program runs."""
    timeout = 1.0
    escape = prog("posix.setpgid(0, posix.getpgid(posix.getppid()))\ntime.sleep(100)", FRESH_POSIX + "import time\n")
    plain = prog("os.setpgid(0, os.getpgid(os.getppid()))\ntime.sleep(100)", "import os, time\n")
    with Sandbox(workers=2, timeout=timeout) as pool:
        pids = pool.worker_pids
        t0 = time.monotonic()
        res = pool.run_programs_detailed([escape, plain, prog("return 1")])
        wall = time.monotonic() - t0
        assert [r.value for r in res] == [None, None, 1.0]
        assert res[0].status == "timeout" and res[0].seconds < timeout + 1.0, res[0]
        assert "setpgid" in res[1].detail
        assert wall < timeout + 2.0  # not timeout + _HANG_GRACE
        assert pool.worker_pids == pids and pool.replaced == 0
        assert pool.run_programs([prog("return 2")]) == [2.0]


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
def test_sympy_programs(eager):
    """ReFT's programs may use sympy (as a global, or imported): a worker imports it before the first
    program that names it (default), or at start-up."""
    pytest.importorskip("sympy")
    assert "sympy" in DEFAULT_LAZY_PRELOAD
    kw = {"preload": DEFAULT_PRELOAD + ("sympy",)} if eager else {}
    programs = [prog("x = sympy.Symbol('x')\nreturn sympy.solve(2 * x - 6, x)[0]"),
                prog("return sympy.Rational(1, 4) + sympy.sqrt(4)", "import sympy\n"),
                prog("a, b = symbols('a b')\ns = solve([Eq(a + b, 10), Eq(a - b, 2)], [a, b])\nreturn s[a]",
                     "from sympy import symbols, Eq, solve\n"),
                prog("x = sympy.Symbol('x')\nreturn sympy.simplify((x ** 2 - 1) / (x - 1)).subs(x, 3)")]
    t0 = time.monotonic()
    with Sandbox(workers=1, timeout=10, **kw) as pool:
        start = time.monotonic() - t0
        assert pool.run_programs([prog("return 1")]) == [1.0]
        assert pool.run_programs(programs) == [3.0, 2.25, 6.0, 4.0]
    assert start < 10.0  # the import is paid once per worker (0.4-0.6 s on 2 cores)


def test_missing_preload_module_is_skipped_with_a_warning():
    with pytest.warns(RuntimeWarning, match="carft_no_such_module"):
        with Sandbox(workers=1, timeout=3, preload=("math", "carft_no_such_module"),
                     lazy_preload=("carft_no_such_lazy",)) as pool:
            errors = pool.layers["errors"]
            assert "preload carft_no_such_module" in errors and "preload carft_no_such_lazy" in errors
            assert pool.run_programs([prog("return math.sqrt(16)")]) == [4.0]


@needs_root
def test_an_interpreter_under_tmp_keeps_its_packages(tmp_path, monkeypatch):
    """CI's venv lives under /tmp (mktemp -d, mode 0700). The private /tmp must not hide it: the
    worker binds the interpreter's trees back (read-only), so preloaded and lazily imported
    packages from that venv still load, and programs still cannot write there."""
    import venv

    assert str(tmp_path).startswith("/tmp/")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site_dir = subprocess.run([str(py), "-I", "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert site_dir.startswith(str(tmp_path))
    token = uuid.uuid4().hex[:8]
    with open(os.path.join(site_dir, f"carft_probe_{token}.py"), "w") as f:
        f.write("VALUE = 17.5\n")
    with open(os.path.join(site_dir, f"carft_lazy_{token}.py"), "w") as f:
        f.write("VALUE = 4.25\n")
    monkeypatch.setattr(sys, "executable", str(py))
    with Sandbox(workers=1, timeout=5, preload=DEFAULT_PRELOAD + (f"carft_probe_{token}",),
                 lazy_preload=(f"carft_lazy_{token}",)) as pool:
        _check_layers(pool)
        got = pool.run_programs([
            prog(f"return carft_probe_{token}.VALUE", f"import carft_probe_{token}\n"),
            prog(f"import carft_lazy_{token}\nreturn carft_lazy_{token}.VALUE"),
            prog(f"open({site_dir + '/evil.py'!r}, 'w').write('x')\nreturn 1"),
        ])
    assert got == [17.5, 4.25, None]
    assert not os.path.exists(os.path.join(site_dir, "evil.py"))
