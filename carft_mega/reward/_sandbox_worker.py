"""Sandbox worker process: runs model-written ``solution()`` programs, one forked child per program.

Started by ``carft_mega.reward.sandbox`` as ``python -I <this file>`` with a minimal environment; it
imports nothing from carft_mega (stdlib only) so that the trainer's state never reaches it.

Protocol (JSON lines): the parent sends one config line, the worker answers one ready line with the
isolation layers it could activate, then for every job line ``{"code", "timeout"}`` it answers
``{"value", "status", "detail", "seconds"}``. EOF on stdin ends the worker.

Isolation, outermost first (each layer is reported; failures of optional layers are tolerated):
  1. worker level, once: new network namespace (no interfaces up, not even loopback) and new mount
     namespace with private tmpfs on /tmp, /var/tmp and /dev/shm (needs root, or unprivileged user
     namespaces); a minimal environment; its own session (the parent's signals do not reach it).
  2. per program, a forked child: own process group (killed as a group on timeout and after exit),
     killed with its worker (PR_SET_PDEATHSIG), no_new_privs, a fresh working directory, stdin/stdout/stderr on
     /dev/null and every other inherited fd closed, rlimits (CPU, address space, file size, no new
     processes/threads, 64 fds, no core), an empty environment, privileges dropped to ``nobody`` when
     running as root (RLIMIT_NPROC and file permissions then apply; root ignores both), and a Python
     audit hook that denies process creation, signals, sockets, ctypes, tracing and gc
     introspection, rewiring functions, writes outside the working directory and reads outside it
     and the interpreter's own directories.
The audit hook is a tripwire, not a boundary (PEP 578 says as much); the OS layers are the boundary.
Forking per program means that nothing a program does (monkeypatching, leaked threads, exhausted
CPU rlimit) survives into the next one, while the interpreter start-up and module imports are paid
once per worker.
"""

import json
import os
import resource
import select
import shutil
import sys
import tempfile
import time

_MiB = 1 << 20
_RESULT_FD = 3
_MAX_RESULT_BYTES = 4096

# Audit events denied outright (CPython 3.8-3.13 names; see the "Audit events table" of the docs).
_DENY_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.putenv", "os.unsetenv", "os.chdir",
    "os.link", "os.symlink", "os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr",
    "os.lockf", "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendmsg",
    "socket.sendto", "socket.sethostname", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
    "ctypes.cdata", "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at", "ctypes.PyObj_FromPtr",
    "ctypes.set_errno", "ctypes.get_errno", "mmap.__new__", "resource.setrlimit", "resource.prlimit",
    "fcntl.ioctl", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
    "sys.setprofile", "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "code.__new__", "function.__new__",
    "_thread.start_new_thread", "cpython.PyInterpreterState_New",
    "cpython.run_command", "cpython.run_file", "cpython.run_module", "cpython.run_stdin",
    "shutil.chown", "shutil.rmtree", "os.chroot", "os.truncate", "webbrowser.open", "syslog.openlog",
    "winreg.OpenKey",
})
# Modules whose import is denied (top-level name). Most are harmless without their syscalls, which
# are audited too; _posixsubprocess and the _test* modules are not audited, hence listed.
_DENY_IMPORTS = frozenset({
    "ctypes", "_ctypes", "_ctypes_test", "_posixsubprocess", "subprocess", "socket", "_socket", "ssl", "_ssl",
    "multiprocessing", "_multiprocessing", "_posixshmem", "mmap", "fcntl", "pty", "termios", "resource",
    "asyncio", "_asyncio", "urllib", "http", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib",
    "webbrowser", "xmlrpc", "socketserver", "_xxsubinterpreters", "_testcapi", "_testinternalcapi",
    "_testbuffer", "_testmultiphase", "_testclinic", "_xxtestfuzz", "faulthandler", "tracemalloc",
    "_tracemalloc", "signal", "threading", "concurrent", "sqlite3", "_sqlite3", "dbm", "shelve", "pathlib",
    "glob", "zipfile", "tarfile", "importlib",
})
# Path-taking events allowed only inside the working directory (and without dir_fd).
_WORKDIR_EVENTS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.rename"})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir"})
# Attribute writes that would let a program rewire a function, the audit hook included (the hook keeps
# its state in keyword defaults). Other attribute writes on classes stay allowed (namedtuple uses them).
_SETATTR_EVENTS = frozenset({"object.__setattr__", "object.__delattr__"})
_PROTECTED_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__", "__globals__", "__closure__",
                              "__builtins__", "__dict__"})

_GLOBAL_MODULES = ("math", "sympy")
DEFAULT_PRELOAD = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools",
                   "operator", "collections", "datetime", "random", "re", "string", "numbers", "heapq",
                   "bisect", "dataclasses", "typing", "enum", "copy", "time")


def _make_audit_hook(workdir, read_roots):
    """Build the audit hook. Everything it uses is bound as a keyword default, so a program cannot
    redirect it by monkeypatching a module or builtins (changing the defaults of a function raises
    ``object.__setattr__``, which the hook denies)."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def norm(p, *, _cwd=workdir, _str=str, _bytes=bytes, _type=type):
        # Pure string normalisation against the fixed cwd (os.chdir is denied). Symlinks cannot be
        # created (os.symlink is denied) so a path normalised into the workdir stays in it.
        t = _type(p)
        if t is _bytes:
            p = p.decode("utf-8", "surrogateescape")
        elif t is not _str:
            return None
        if "\x00" in p:
            return None
        if not p.startswith("/"):
            p = _cwd + "/" + p
        parts = []
        for part in p.split("/"):
            if part == "" or part == ".":
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(part)
        return "/" + "/".join(parts)

    def inside(path, roots):
        if path is None:
            return False
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def hook(event, args, *, _deny=_DENY_EVENTS, _deny_imports=_DENY_IMPORTS, _wd_events=_WORKDIR_EVENTS,
             _read_events=_READ_EVENTS, _setattr_events=_SETATTR_EVENTS, _protected=_PROTECTED_ATTRS,
             _norm=norm, _inside=inside, _wd=(workdir,),
             _read=(workdir,) + tuple(read_roots), _Err=PermissionError, _int=int, _type=type, _str=str,
             _none=None, _wflags=write_flags):
        if event in _deny:
            raise _Err(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if _type(path) is _int:
                return  # an already-open fd (only /dev/null and the result pipe exist)
            if mode is _none:
                raise _Err("sandbox: os.open is not allowed")  # dir_fd would bypass the path check
            p = _norm(path)
            writing = (flags & _wflags) or ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            if not _inside(p, _wd if writing else _read):
                raise _Err("sandbox: open() outside the working directory")
        elif event == "import":
            name = args[0]
            if _type(name) is _str and name.partition(".")[0] in _deny_imports:
                raise _Err(f"sandbox: import {name} is not allowed")
        elif event in _wd_events:
            # dir_fd arguments are reported as -1 (or None) when absent; any real dir_fd is denied.
            if event == "os.rename":
                src, dst, sfd, dfd = args
                if sfd not in (-1, _none) or dfd not in (-1, _none) or not _inside(_norm(src), _wd) \
                        or not _inside(_norm(dst), _wd):
                    raise _Err("sandbox: rename outside the working directory")
            else:
                if args[-1] not in (-1, _none) or not _inside(_norm(args[0]), _wd):
                    raise _Err(f"sandbox: {event} outside the working directory")
        elif event in _setattr_events:
            if args[1] in _protected:
                raise _Err(f"sandbox: setting {args[1]} is not allowed")
        elif event in _read_events:
            path = args[0]
            if path is _none:
                return
            if _type(path) is not _int and not _inside(_norm(path), _read):
                raise _Err(f"sandbox: {event} outside the working directory")

    return hook


# --------------------------------------------------------------------------------------- worker set-up

def _setup_namespaces(private_tmp):
    """Network namespace (+ mount namespace with private tmpfs dirs). Returns (layers, errors)."""
    layers, errors = {"netns": False, "private_tmp": False, "userns": False}, {}
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
    MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
    try:
        import ctypes  # dropped from sys.modules by _forget_ctypes(); programs may not import it

        libc = ctypes.CDLL(None, use_errno=True)
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNET | (CLONE_NEWNS if private_tmp else 0)
        if os.geteuid() != 0:
            flags |= CLONE_NEWUSER
        if libc.unshare(flags) != 0:
            errors["unshare"] = os.strerror(ctypes.get_errno())
        else:
            layers["netns"] = True
            if flags & CLONE_NEWUSER:
                layers["userns"] = True
                # Identity map so that files and processes keep the caller's uid on the host.
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            if private_tmp:
                if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                    errors["mount_private"] = os.strerror(ctypes.get_errno())
                else:
                    ok = True
                    for d in ("/tmp", "/var/tmp", "/dev/shm"):
                        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                                                           b"size=64m,mode=1777") != 0:
                            errors[f"tmpfs {d}"] = os.strerror(ctypes.get_errno())
                            ok = ok and d != "/tmp"
                    layers["private_tmp"] = ok
    except Exception as e:  # no ctypes, no libc, seccomp ...
        errors["namespaces"] = f"{type(e).__name__}: {e}"
    return layers, errors


def _get_prctl():
    """libc's prctl (for PR_SET_PDEATHSIG in the children), or None."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        return prctl
    except Exception:
        return None


def _forget_ctypes():
    # Programs cannot import it again (the import is denied), and calls through a leftover function
    # object raise the audited ctypes.call_function event.
    for k in [k for k in sys.modules if k.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[k]


def _nobody():
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


def _vm_size_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_roots():
    roots = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        if p:
            roots.add(os.path.realpath(p))
            roots.add(os.path.abspath(p))
    return sorted(roots)


# --------------------------------------------------------------------------------------- one program

def _child(code, workdir, cfg, drop, read_roots, prctl, worker_pid):
    """Runs in the forked child; never returns (os._exit)."""
    try:
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(_RESULT_FD + 1, 1 << 16)  # the parent's pipes and everything else
        os.chdir(workdir)
        os.umask(0o077)
        cpu = int(cfg["cpu_seconds"])
        limits = [(resource.RLIMIT_CPU, cpu, cpu + 1),
                  (resource.RLIMIT_AS, cfg["memory_mb"] * _MiB, cfg["memory_mb"] * _MiB),
                  (resource.RLIMIT_FSIZE, cfg["fsize_mb"] * _MiB, cfg["fsize_mb"] * _MiB),
                  (resource.RLIMIT_NPROC, 0, 0),  # no fork, no threads (root is exempt: see drop)
                  (resource.RLIMIT_NOFILE, 64, 64),
                  (resource.RLIMIT_CORE, 0, 0)]
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        if drop is not None:
            uid, gid = drop
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        if prctl is not None:
            # Die with the worker (a worker killed from outside must not leave orphans running).
            # Set after setuid, which clears it; the getppid check closes the race with its death.
            prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
            if os.getppid() != worker_pid:
                os._exit(1)
            # An exec that slips past the audit hook gains nothing from setuid binaries.
            prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        os.environ.clear()
        # Bind what the epilogue needs before the program can touch modules or builtins.
        write, isfinite, repr_, float_ = os.write, __import__("math").isfinite, repr, float
        bool_, str_, bytes_, BaseException_ = bool, str, bytes, BaseException
        namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        for name in _GLOBAL_MODULES:  # ReFT prepends "import math" and "import sympy" to every program
            if name in sys.modules:
                namespace[name] = sys.modules[name]
        sys.addaudithook(_make_audit_hook(workdir, read_roots))
    except BaseException as e:
        try:
            os.write(_RESULT_FD, f"Nsetup failed: {type(e).__name__}: {e}"[:_MAX_RESULT_BYTES].encode())
        finally:
            os._exit(1)
    try:
        try:
            exec(compile(code, "<program>", "exec"), namespace)
            fn = namespace.get("solution")
            if fn is None:
                msg = b"Nno solution() defined"
            else:
                result = fn()
                if isinstance(result, (bool_, str_, bytes_)):
                    msg = f"Nsolution() returned {type(result).__name__}".encode()
                else:
                    value = float_(result)
                    msg = ("V" + repr_(value)).encode() if isfinite(value) else b"Nnot a finite number"
        except BaseException_ as e:  # SystemExit and KeyboardInterrupt too
            try:
                msg = f"N{type(e).__name__}: {e}"[:200].encode("utf-8", "replace")
            except BaseException_:
                msg = b"Nexception"
        write(_RESULT_FD, msg)
    except BaseException:
        pass
    os._exit(0)


def _wait(pid, deadline):
    """Wait for ``pid`` until ``deadline`` (monotonic). Returns its wait status, or None on timeout."""
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pass
    try:
        delay = 0.0005
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.02)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _killpg(pid):
    try:
        os.killpg(pid, 9)
    except OSError:
        pass


def run_one(code, timeout, state):
    cfg = state["cfg"]
    state["n"] += 1
    workdir = os.path.join(state["root"], str(state["n"]))
    os.mkdir(workdir, 0o700)
    if state["drop"] is not None:
        os.chown(workdir, *state["drop"])
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)  # r may be fd 3; after this fd 3 is free or already is w
        if w != _RESULT_FD:
            os.dup2(w, _RESULT_FD)
        _child(code, workdir, cfg, state["drop"], state["read_roots"], state["prctl"], state["pid"])
    os.close(w)
    try:
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    except OSError:
        pass
    status = _wait(pid, t0 + timeout)
    seconds = time.monotonic() - t0
    _killpg(pid)  # on timeout, and any stray descendant after a normal exit
    if status is None:
        os.waitpid(pid, 0)
    os.set_blocking(r, False)
    data = b""
    try:
        while len(data) < _MAX_RESULT_BYTES:
            chunk = os.read(r, _MAX_RESULT_BYTES)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    os.close(r)
    shutil.rmtree(workdir, ignore_errors=True)
    if status is None:
        return {"value": None, "status": "timeout", "detail": f"wall clock > {timeout:g} s", "seconds": seconds}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        what = {9: "SIGKILL", 24: "SIGXCPU (cpu limit)", 25: "SIGXFSZ (file size limit)", 11: "SIGSEGV"}.get(sig, "")
        return {"value": None, "status": "crashed", "detail": f"signal {sig} {what}".strip(), "seconds": seconds}
    if data.startswith(b"V") and b"\n" not in data:
        try:
            value = float(data[1:].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            value = None
        if value is not None and value == value and abs(value) != float("inf"):
            return {"value": value, "status": "ok", "detail": "", "seconds": seconds}
        return {"value": None, "status": "error", "detail": "malformed result", "seconds": seconds}
    if data.startswith(b"N"):
        return {"value": None, "status": "error", "detail": data[1:].decode("utf-8", "replace"), "seconds": seconds}
    return {"value": None, "status": "crashed", "detail": f"exit status {os.waitstatus_to_exitcode(status)}, no result",
            "seconds": seconds}


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    cfg = json.loads(stdin.readline())
    layers, errors = {}, {}
    if cfg["isolate"]:
        layers, errors = _setup_namespaces(cfg["private_tmp"])
    prctl = _get_prctl()
    _forget_ctypes()
    for name in cfg["preload"]:
        try:
            __import__(name)
        except ImportError as e:
            errors[f"preload {name}"] = str(e)
    vm_kib = _vm_size_kib()
    if vm_kib is not None and vm_kib // 1024 + 64 > cfg["memory_mb"]:
        errors["memory_mb"] = (f"memory_mb={cfg['memory_mb']} leaves programs no room: the worker already maps "
                               f"{vm_kib // 1024} MiB of address space (RLIMIT_AS counts it)")
    drop = None
    if os.geteuid() == 0 and cfg["drop_privileges"]:
        drop = _nobody()
    root = tempfile.mkdtemp(prefix="carft_sandbox_")
    os.chmod(root, 0o711)
    state = {"cfg": cfg, "root": root, "n": 0, "drop": drop, "read_roots": _read_roots(), "prctl": prctl,
             "pid": os.getpid()}
    layers.update({"audit_hook": True, "rlimits": True, "process_group": True, "fresh_workdir": True,
                   "minimal_env": True, "drop_privileges": drop is not None, "uid": drop[0] if drop else os.geteuid(),
                   "pidfd": hasattr(os, "pidfd_open"), "die_with_worker": prctl is not None,
                   "no_new_privs": prctl is not None})
    ready = {"ready": True, "pid": os.getpid(), "root": root, "layers": layers, "errors": errors}
    stdout.write(json.dumps(ready).encode() + b"\n")
    stdout.flush()
    try:
        for line in stdin:
            job = json.loads(line)
            try:
                res = run_one(job["code"], float(job["timeout"]), state)
            except Exception as e:  # a worker-side failure (e.g. disk full): report, keep serving
                res = {"value": None, "status": "sandbox_error", "detail": f"{type(e).__name__}: {e}", "seconds": 0.0}
            stdout.write(json.dumps(res).encode() + b"\n")
            stdout.flush()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
