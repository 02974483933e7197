"""The sandbox for a trainer that is not root (GPU clusters).

From this test process (root in CI), a subprocess drops to an unprivileged uid and runs the sandbox:
full isolation through unprivileged user namespaces, or, where the kernel refuses them, a refusal
that says why and what to do, and the weak mode only when the config asks for it. Before dropping,
the subprocess makes the interpreter reachable for that uid in a private mount namespace of its own
(CI's venv lies in a 0700 ``mktemp -d``, this machine's python under a 0700 /root): it mounts an
empty directory over each root-only directory on the way and binds back only the entries needed.
The host is not changed. Run as a non-root user, the same tests run the subprocess as that user.
"""

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from carft_mega.reward import _sandbox_seccomp

UID = GID = 65534  # nobody / nogroup
ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("CARFT_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
GOLD = os.path.abspath(os.path.join(DATA, "svamp", "svamp_python_sdp.json"))
SECRET = "carft-sentinel-" + uuid.uuid4().hex


def _needed_paths():
    paths = {os.path.realpath(sys.executable), sys.executable, sys.prefix, sys.base_prefix, REPO}
    paths.update(os.path.realpath(p) for p in sys.path if p and os.path.exists(p))
    return sorted(paths)


def _preexec(drop: bool, deny_unshare: bool):
    """Runs in the child before exec: private mount namespace with the interpreter reachable for
    UID (root only), then optionally a seccomp filter that refuses unshare(2) (a kernel or container
    that does not allow namespaces), then the drop to UID."""
    paths = _needed_paths()

    def run():
        libc = ctypes.CDLL(None, use_errno=True)

        def check(ret, what):
            if ret != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"{what}: {os.strerror(err)}")

        if ROOT:
            check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
            check(libc.mount(b"none", b"/", None, 16384 | (1 << 18), None), "make / private")
            for _ in range(32):  # outermost root-only directory first, until every path is reachable
                blocked = {}
                for p in paths:
                    parts = [c for c in p.split("/") if c]
                    for i in range(1, len(parts)):
                        d = "/" + "/".join(parts[:i])
                        if not os.stat(d).st_mode & 0o001:
                            blocked.setdefault(d, set()).add(parts[i])
                            break
                if not blocked:
                    break
                d = min(blocked, key=len)
                keep = {c: (os.open(os.path.join(d, c), os.O_PATH | os.O_CLOEXEC), os.path.isdir(os.path.join(d, c)))
                        for c in blocked[d]}
                check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"mode=0755,size=64k"), f"tmpfs {d}")
                for c, (fd, is_dir) in keep.items():
                    target = os.path.join(d, c)
                    if is_dir:
                        os.mkdir(target, 0o755)
                    else:
                        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                    check(libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, 4096 | 16384, None),
                          f"bind {target}")
                    os.close(fd)
        if deny_unshare:
            arch = _sandbox_seccomp.machine()
            nr = _sandbox_seccomp.TABLES[arch]["unshare"]
            prog = [(0x20, 0, 0, 4), (0x15, 1, 0, _sandbox_seccomp._AUDIT_ARCH[arch]), (0x06, 0, 0, 0x7FFF0000),
                    (0x20, 0, 0, 0), (0x15, 0, 1, nr), (0x06, 0, 0, 0x00050000 | 1), (0x06, 0, 0, 0x7FFF0000)]
            code = _sandbox_seccomp.pack(prog)
            buf = ctypes.create_string_buffer(code, len(code))

            class Fprog(ctypes.Structure):
                _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

            fp = Fprog(len(prog), ctypes.addressof(buf))
            check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
            check(libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(fp)), 0, 0), "seccomp")
        if ROOT and drop:
            os.setgroups([])
            os.setgid(GID)
            os.setuid(UID)

    return run


def run_script(script: str, drop: bool = True, deny_unshare: bool = False, timeout: int = 240) -> dict:
    """Run ``script`` (which prints one JSON line last) as the unprivileged uid; returns that JSON."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "CARFT_DATA_DIR": os.path.abspath(DATA)}
    p = subprocess.run([sys.executable, "-I", "-c", script], preexec_fn=_preexec(drop, deny_unshare), cwd="/",
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _kernel_allows_userns() -> bool:
    out = run_script("import ctypes, json\nprint(json.dumps(ctypes.CDLL(None).unshare(0x10000000)))")
    return out == 0


@pytest.fixture(scope="module")
def sentinels():
    """A world-readable secret (the unprivileged trainer may read it, so an escaped program could),
    and a directory the unprivileged trainer may write to."""
    d = tempfile.mkdtemp(prefix="carft_nonroot_", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.chmod(d, 0o755)
    public = os.path.join(d, "public.txt")
    with open(public, "w") as f:
        f.write(SECRET)
    os.chmod(public, 0o644)
    writable = os.path.join(d, "writable")
    os.mkdir(writable, 0o755)
    if ROOT:
        os.chown(writable, UID, GID)
    yield {"public": public, "writable": writable}
    shutil.rmtree(d, ignore_errors=True)


_FULL = r"""
import json, os, sys
from carft_mega.reward.sandbox import Sandbox, SandboxUnavailableError
out = {"uid": os.getuid()}
def prog(body, imports=""):
    return imports + "def solution():\n" + "\n".join("    " + l for l in body.strip("\n").split("\n")) + "\n"
PUBLIC, WRITABLE, GOLD, SECRET = sys.argv[1:5] if len(sys.argv) > 4 else ARGS
try:
    with Sandbox(workers=2, timeout=30) as sb:
        out["layers"] = sb.layers
        out["values"] = sb.run_programs([
            prog("return 6 * 7"), prog("return float(os.getuid())", "import os\n"),
            prog("return float(len(textwrap.wrap('a b c', 1)))", "import textwrap\n"),
            prog("x = sympy.Symbol('x')\nreturn sympy.solve(2 * x - 6, x)[0]"),
            prog("open('f', 'w').write('5')\nreturn float(open('f').read())")])
    with Sandbox(workers=1, timeout=30, audit_hook=False) as sb:
        res = sb.run_programs_detailed([
            prog(f"return float({SECRET!r} in open({PUBLIC!r}).read())"),
            prog(f"return float(len(open({GOLD!r}).read()))"),
            prog(f"open({WRITABLE!r} + '/escaped', 'w').write('x')\nreturn 1"),
            prog("return float(len(os.listdir('/proc')))", "import os\n"),
            prog("import _socket\nreturn 1"),
            prog("import _thread\n_thread.start_new_thread(print, ())\nreturn 1"),
            prog("return float(os.getuid())", "import os\n")])
        out["attacks"] = [[r.value, r.status, r.detail] for r in res]
except SandboxUnavailableError as e:
    out["refused"] = str(e)
out["escaped"] = os.path.exists(WRITABLE + "/escaped")
print(json.dumps(out))
"""


def test_unprivileged_trainer_gets_the_full_isolation(sentinels):
    """Not root, and the kernel allows unprivileged user namespaces (this machine and CI do): the
    workers enter a user namespace first, then the rest, and programs get the same minimal root,
    namespaces and filter as under root; with the hook off, a program still cannot read a file
    the trainer's user can read, or write where it can write. If the kernel refuses user
    namespaces, the pool refuses to start and says so."""
    allowed = _kernel_allows_userns()
    args = (sentinels["public"], sentinels["writable"], GOLD, SECRET)
    out = run_script(_FULL.replace("ARGS", repr(args)))
    assert out["uid"] == (UID if ROOT else os.geteuid())
    if not allowed:
        assert "reward.sandbox_insecure_allow_no_namespaces" in out["refused"], out
        assert "CLONE_NEWUSER" in out["refused"], out
        return
    layers = out["layers"]
    for name in ("userns", "mountns", "pidns", "netns", "ipcns", "minimal_root", "read_only_root", "fresh_tmpfs",
                 "seccomp", "no_new_privs", "audit_hook"):
        assert layers[name] is True, (name, layers)
    assert layers["drop_privileges"] is False and layers["uid"] == out["uid"] and not layers["server_has_ctypes"]
    assert out["values"] == [42.0, float(out["uid"]), 3.0, 3.0, 5.0], out
    values = [a[0] for a in out["attacks"]]
    assert values == [None] * 6 + [float(out["uid"])], out["attacks"]
    assert "can't start new thread" in out["attacks"][5][2], out["attacks"][5]  # RLIMIT_NPROC in the userns
    assert all("No such file or directory" in a[2] for a in out["attacks"][:2]), out["attacks"]
    assert not out["escaped"] and not os.path.exists(os.path.join(sentinels["writable"], "escaped"))


_REFUSED = r"""
import json, os, warnings
from carft_mega.config import RewardConfig
from carft_mega.reward.sandbox import Sandbox, SandboxUnavailableError
out = {}
try:
    Sandbox.from_config(RewardConfig(sandbox_workers=1))
    out["started"] = True
except SandboxUnavailableError as e:
    out["refused"] = str(e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cfg = RewardConfig(sandbox_workers=1, sandbox_timeout=30.0, sandbox_insecure_allow_no_namespaces=True)
    with Sandbox.from_config(cfg) as sb:
        out["layers"] = sb.layers
        out["values"] = sb.run_programs([
            "def solution():\n    return 6 * 7\n",
            "import textwrap\ndef solution():\n    return len(textwrap.wrap('a b c', 1))\n",
            "def solution():\n    return len(open(PUBLIC).read())\n".replace("PUBLIC", repr(PUBLIC)),
            "import os\ndef solution():\n    os.kill(os.getppid(), 9)\n"])
out["warnings"] = [str(w.message) for w in caught]
print(json.dumps(out))
"""


def test_refused_user_namespaces_are_a_clear_error():
    """Where the kernel refuses user namespaces (here: a seccomp filter that refuses unshare(2), as a
    container runtime's default profile does), python-style rewards refuse to start with the reason
    and the remedies, naming the config field of the weak mode; with that field set, the pool runs
    without namespaces (audit hook, rlimits, seccomp) and warns."""
    out = run_script(_REFUSED.replace("PUBLIC", repr(GOLD)), deny_unshare=True)
    assert "started" not in out, out
    msg = out["refused"]
    for part in ("unshare", "reward.sandbox_insecure_allow_no_namespaces=True", "ask the administrator"):
        assert part in msg, msg
    layers = out["layers"]
    assert layers["seccomp"] and layers["audit_hook"] and not layers["minimal_root"] and not layers["pidns"], layers
    assert "namespaces" in layers["errors"], layers
    assert out["values"] == [42.0, 3.0, None, None], out
    assert any("WITHOUT namespaces" in w for w in out["warnings"]), out["warnings"]


_DEGRADE = r"""
import json
from carft_mega.reward.sandbox import Sandbox
nest, writer, precreate = PROGRAMS
out = {}
with Sandbox(workers=1, timeout=30, namespaces="off", audit_hook=False, tmp_mb=32) as sb:
    pid = sb.worker_pids
    res = sb.run_programs_detailed([nest, writer, precreate, writer, writer])
    out["res"] = [[r.value, r.status, r.detail] for r in res]
    out["same_worker"] = sb.worker_pids == pid and sb.replaced == 0
    out["sandbox_errors"] = sb.stats()["sandbox_errors"]
    out["layers"] = sb.layers
print(json.dumps(out))
"""


@pytest.mark.parametrize("drop", [True, False], ids=["unprivileged", "root_trainer"])
def test_weak_mode_program_cannot_degrade_the_next(drop):
    """The weak mode (namespaces off) has no fresh tmpfs: each program gets a directory with an
    unpredictable name, removed without recursion afterwards, so 1100 nested directories and a full
    disk do not break the clean-up, and a program cannot pre-create the next program's directory.
    Runs unprivileged and, if this process is root, as a root trainer (programs as nobody)."""
    if not drop and not ROOT:
        pytest.skip("the root-trainer variant needs root")
    from test_sandbox_escapes import degrade_programs

    out = run_script(_DEGRADE.replace("PROGRAMS", repr(degrade_programs())), drop=drop)
    values = [r[0] for r in out["res"]]
    assert out["res"][0][1] == "ok" and values[0] >= 1, out["res"][0]
    assert [values[i] for i in (1, 3, 4)] == [7.0, 7.0, 7.0] and out["res"][2][1] == "ok", out["res"]
    assert out["same_worker"] and out["sandbox_errors"] == 0
    assert not out["layers"]["minimal_root"] and out["layers"]["seccomp"]
