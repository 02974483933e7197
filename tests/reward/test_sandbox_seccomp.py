"""The sandbox's seccomp filter (``carft_mega.reward._sandbox_seccomp``): its syscall numbers, what it
denies and allows when installed in a real process, and that every running worker has it."""

import json
import os
import re
import subprocess
import sys

import pytest

from carft_mega.reward import Sandbox
from carft_mega.reward import _sandbox_seccomp as sc

ARCH = sc.machine()
needs_arch = pytest.mark.skipif(ARCH is None, reason="the filter has tables for x86_64 and aarch64 only")
HEADERS = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "aarch64": "/usr/include/asm-generic/unistd.h"}


@pytest.mark.parametrize("arch", sorted(sc.TABLES))
def test_syscall_numbers_match_the_kernel_headers(arch):
    path = HEADERS[arch]
    if not os.path.exists(path) and arch == "x86_64" and os.path.exists("/usr/include/asm/unistd_64.h"):
        path = "/usr/include/asm/unistd_64.h"
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed (linux-libc-dev)")
    with open(path) as f:
        text = f.read()
    nrs = {k: int(v) for k, v in re.findall(r"#define __NR3?2?6?4?_(\w+)\s+(\d+)\b", text)}
    table = sc.TABLES[arch]
    missing = [n for n in table if n not in nrs]
    assert not missing, missing
    wrong = {n: (table[n], nrs[n]) for n in table if table[n] != nrs[n]}
    assert not wrong, wrong


def test_filter_shape():
    for arch in sc.TABLES:
        prog = sc.build_filter(arch, exec_fd=900)
        assert len(prog) < 4096 and len(sc.pack(prog)) == 8 * len(prog)
        # every jump stays inside the program
        for i, (code, jt, jf, _) in enumerate(prog):
            if code & 0x07 == 0x05:  # BPF_JMP
                assert i + 1 + max(jt, jf) < len(prog)
        assert prog[-1] == (0x06, 0, 0, 0x7FFF0000)  # default: allow


_PROBE = r"""
import ctypes, json, os, sys, threading
sys.path.insert(0, {libdir!r})
import _sandbox_seccomp as sc
libc = ctypes.CDLL(None, use_errno=True)
nrs = sc.TABLES[sc.machine()]
fd = os.open("/bin/true" if os.path.exists("/bin/true") else sys.executable, os.O_PATH | os.O_CLOEXEC)
os.dup2(fd, 900, inheritable=False)
def call(name, *args):
    r = libc.syscall(ctypes.c_long(nrs[name]), *[ctypes.c_long(a) for a in args])
    return -ctypes.get_errno() if r == -1 else r
control = {{n: call(n, -1, 0, 0) for n in ("socket", "shmget", "pidfd_open", "keyctl", "bpf", "mq_open")}}
sc.install(exec_fd=900)
out = {{"control": control, "denied": {{n: call(n, -1, 0, 0) for n in sc.DENIED if n in nrs}}}}
out["clone3"] = call("clone3", 0, 0)
out["clone_newuser"] = call("clone", 0x10000000 | 17, 0, 0, 0, 0)
out["unshare_user"] = call("unshare", 0x10000000)
out["getpid"] = call("getpid") if "getpid" in nrs else os.getpid()
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
t = threading.Thread(target=lambda: None); t.start(); t.join()
out["thread"] = True
try:
    os.execv("/bin/true", ["true"])
except OSError as e:
    out["execv"] = e.errno
pid = os.fork()
if pid == 0:
    try:
        os.execve(900, ["true"], {{}})
    finally:
        os._exit(99)
out["fexecve_allowed_fd"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
pid = os.fork()
if pid == 0:
    fd2 = os.open("/bin/true", os.O_PATH)
    try:
        os.execve(fd2, ["true"], {{}})
    except OSError as e:
        os._exit(e.errno)
    os._exit(98)
out["fexecve_other_fd"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(out))
"""


@needs_arch
def test_installed_filter_denies_and_allows():
    """A real process under the filter: each denied syscall fails with EPERM (clone3 with ENOSYS),
    fork and threads work, exec works only through the one allowed descriptor."""
    code = _PROBE.format(libdir=os.path.dirname(sc.__file__))
    p = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert all(v != -1 for v in out["control"].values()), out["control"]  # not EPERM without the filter
    assert out["denied"] and all(v == -1 for v in out["denied"].values()), out["denied"]  # -EPERM
    assert out["clone3"] == -38 and out["clone_newuser"] == -1 and out["unshare_user"] == -1
    assert out["getpid"] > 0 and out["fork"] == 7 and out["thread"]
    assert out["execv"] == 1  # EPERM
    assert out["fexecve_allowed_fd"] == 0  # /bin/true ran
    assert out["fexecve_other_fd"] == 1  # EPERM


def _server_pid(worker_pid):
    """The server: the worker's child (pid 1 of the worker's PID namespace)."""
    with open(f"/proc/{worker_pid}/task/{worker_pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    assert len(kids) == 1, kids
    return kids[0]


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@needs_arch
def test_every_server_runs_under_the_filter():
    with Sandbox(workers=2, timeout=30) as pool:
        assert pool.layers["seccomp"] and pool.layers["no_new_privs"]
        for wpid in pool.worker_pids:
            st = _status(_server_pid(wpid))
            assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1", st
            if os.geteuid() == 0:  # root server: only SETUID, SETGID and KILL can ever be effective
                assert int(st["CapBnd"], 16) == (1 << 5) | (1 << 6) | (1 << 7), st["CapBnd"]
            else:
                assert int(st["CapEff"], 16) == 0, st["CapEff"]
        assert pool.run_programs(["def solution():\n    return 2.5\n"]) == [2.5]
