"""Sandbox worker process: runs model-written ``solution()`` programs, one forked child per program.

Started by ``carft_mega.reward.sandbox`` as ``python -I <this file>`` with a minimal environment; it
imports nothing from carft_mega (stdlib only) so that the trainer's state never reaches it.

Protocol (JSON lines): the parent sends one config line, the worker answers one ready line with the
isolation layers it could activate, then for every job line ``{"code", "timeout"}`` it answers
``{"value", "status", "detail", "seconds"}``. EOF on stdin ends the worker.

Isolation, outermost first (each layer is reported; failures of optional layers are tolerated):
  1. worker level, once: new network namespace (no interfaces up, not even loopback), new PID
     namespace (the worker re-forks itself and serves as its pid 1: programs see no process outside
     it, cannot signal the trainer or a program of another worker, and everything left in it dies
     with the worker) and new mount namespace in which the whole tree is read-only (recursive), /tmp
     is a private tmpfs (root-owned 0755: only the programs' own directories in it are writable),
     /var/tmp, /dev/shm, /run/lock are empty read-only tmpfs, and /proc is a fresh proc of the PID
     namespace (hidepid=2). Needs root, or unprivileged user namespaces. A minimal environment; its
     own session (the parent's signals do not reach it); not dumpable (no ptrace, no /proc access).
  2. per program, a forked child: own process group; after it ends the worker kills it, its group,
     and (as pid 1) every other process in its PID namespace; killed with its worker
     (PR_SET_PDEATHSIG), no_new_privs, a fresh working directory, stdin/stdout/stderr on /dev/null
     and every other inherited fd closed, rlimits (CPU, address space, file size, no new
     processes/threads, 64 fds, no core), an empty environment, privileges dropped to ``nobody`` when
     running as root (RLIMIT_NPROC and file permissions then apply; root ignores both) and all
     capabilities cleared otherwise, the kill/pidfd/process-group/fork/exec functions removed from
     ``os`` and the ``signal``/``_signal``/``ctypes`` modules from ``sys.modules``, and a Python
     audit hook that denies process creation, signals, sockets, ctypes, tracing and gc
     introspection, rewiring functions, writes outside the working directory and reads outside it
     and the interpreter's own directories.
The audit hook is a tripwire, not a boundary (PEP 578 says as much); the OS layers are the boundary.
Without root and without user namespaces only layer 2 exists, and a program that gets past the hook
acts with the trainer's uid: it can read what the trainer can read, write where it can write, and
signal its processes.
Forking per program means that nothing a program does (monkeypatching, leaked threads, exhausted
CPU rlimit) survives into the next one, while the interpreter start-up and module imports are paid
once per worker.
"""

import gc
import importlib.util
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
    "glob", "zipfile", "tarfile", "importlib", "_signal",
})
# Removed from os/posix in every program (defence in depth: pidfd_open and signal.pidfd_send_signal
# raise no audit event, nor do setpgid/setsid, which would let a program leave its process group).
_REMOVED_OS_FUNCS = ("kill", "killpg", "pidfd_open", "setpgid", "setpgrp", "setsid", "tcsetpgrp", "fork",
                     "forkpty", "execv", "execve", "posix_spawn", "posix_spawnp", "system", "setns", "unshare",
                     "register_at_fork", "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid",
                     "setregid", "setresgid", "setgroups")
# Dropped from sys.modules once per worker after the preload (sympy imports all of them), with the
# module attributes that point at them: the worker does not need them, programs may not import them,
# and an import that finds a module in sys.modules raises no audit event.
_FORGOTTEN_MODULES = ("ctypes", "_ctypes", "signal", "_signal", "subprocess", "_posixsubprocess")
# Path-taking events allowed only inside the working directory (and without dir_fd).
_WORKDIR_EVENTS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.rename"})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir"})
# Attribute writes that would let a program rewire a function, the audit hook included. Other
# attribute writes on classes stay allowed (namedtuple uses them).
_SETATTR_EVENTS = frozenset({"object.__setattr__", "object.__delattr__"})
_PROTECTED_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__", "__globals__", "__closure__",
                              "__builtins__", "__dict__"})

_GLOBAL_MODULES = ("math", "sympy")
DEFAULT_PRELOAD = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools",
                   "operator", "collections", "datetime", "random", "re", "string", "numbers", "heapq",
                   "bisect", "dataclasses", "typing", "enum", "copy", "time")
# Imported by a worker before the first program whose text mentions the name. ReFT's programs may use
# sympy (as a global, like math); importing it takes 0.4-0.6 s and grows the worker from 18 to 53 MiB,
# and fork() time grows with it: 0.7 -> 2.8 ms per program, 657 -> 266 programs/s with SVAMP's programs
# (2 workers, 2-core VM). Most programs never use it, so they keep the lean worker until one does.
DEFAULT_LAZY_PRELOAD = ("sympy",)


def _make_audit_hook(workdir, read_roots):
    """Build the audit hook. Everything it uses is bound as a positional default: a program cannot
    redirect it by monkeypatching a module or builtins, replacing ``__defaults__`` raises
    ``object.__setattr__`` (denied), and the defaults tuple and every value in it are immutable (a
    program that reaches the hook's frame through a traceback finds nothing it can change; keyword
    defaults live in a mutable dict, closure cells have a writable ``cell_contents``)."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def norm(p, _cwd=workdir, _str=str, _bytes=bytes, _type=type):
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

    def hook(event, args, _deny=_DENY_EVENTS, _deny_imports=_DENY_IMPORTS, _wd_events=_WORKDIR_EVENTS,
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

_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x20000000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 8, 32, 4096
_MS_REC, _MS_PRIVATE = 16384, 1 << 18


def _libc():
    """(ctypes module, libc) or (None, None). ctypes is dropped from sys.modules after the preload."""
    try:
        import ctypes

        return ctypes, ctypes.CDLL(None, use_errno=True)
    except Exception:  # no ctypes, no libc
        return None, None


def _unshare(ctypes, libc, private_fs, layers, errors):
    """New network, PID and (with ``private_fs``) mount namespaces for this process; a user namespace
    too when not root. The PID namespace applies to the children: see ``_become_pid1``."""
    uid, gid = os.getuid(), os.getgid()
    base = _CLONE_NEWNET | (_CLONE_NEWNS if private_fs else 0) | (_CLONE_NEWUSER if os.geteuid() != 0 else 0)
    for flags in (base | _CLONE_NEWPID, base):  # without a PID namespace if the kernel refuses one
        if libc.unshare(flags) == 0:
            break
        errors["unshare" if flags & _CLONE_NEWPID else "unshare (no pidns)"] = os.strerror(ctypes.get_errno())
    else:
        return
    errors.pop("unshare", None)
    layers.update(netns=True, mountns=bool(flags & _CLONE_NEWNS), pidns=bool(flags & _CLONE_NEWPID),
                  userns=bool(flags & _CLONE_NEWUSER))
    if flags & _CLONE_NEWUSER:
        # Identity map so that files and processes keep the caller's uid on the host.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _become_pid1(prctl):
    """Fork; the child is pid 1 of the new PID namespace and carries on as the worker, the parent (what
    sandbox.py started and kills) only waits for it. The child dies with the parent (PR_SET_PDEATHSIG),
    and every process in the namespace dies with the child."""
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(alive_r)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):  # the child holds the pipes: EOF reaches sandbox.py when it exits
            os.dup2(devnull, fd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except BaseException:
            code = 1
        os._exit(code if code >= 0 else 128 - code)
    os.close(alive_w)
    prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if select.select([alive_r], [], [], 0)[0]:  # EOF: the parent died before the prctl
        os._exit(1)
    os.close(alive_r)


def _interpreter_paths_under(top):
    """Directories of this interpreter (prefix, sys.path entries) inside ``top``, outermost only."""
    found = []
    for p in sorted({os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, *sys.path) if p}):
        inside = p == top or p.startswith(top.rstrip("/") + "/")
        if inside and p != top and os.path.isdir(p) and not any(p.startswith(q + "/") for q in found):
            found.append(p)
    return found


def _private_fs(ctypes, libc, pidns, layers, errors):
    """In the new mount namespace: the whole tree read-only, a private /tmp (root-owned 0755, the
    workers' directories go there), empty read-only tmpfs over the other world-writable directories,
    and /proc of the PID namespace only (an empty tmpfs without one)."""
    def mount(src, target, fstype, flags, data=None):
        if libc.mount(src, target.encode(), fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")

    try:
        mount(b"none", "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back to the host
    except OSError as e:
        errors["mount_private"] = str(e)
        return
    # Read-only: mount_setattr(2) with AT_RECURSIVE (Linux 5.12, syscall 442 on every architecture);
    # else remount every mount point of /proc/self/mountinfo one by one.
    attr = (ctypes.c_uint64 * 4)(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    ro = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), ctypes.c_char_p(b"/"), ctypes.c_uint(0x8000),
                      ctypes.byref(attr), ctypes.c_size_t(32)) == 0
    if not ro:
        try:
            with open("/proc/self/mountinfo") as f:
                points = [ln.split()[4].encode().decode("unicode_escape") for ln in f]
            for mp in sorted(set(points), key=len):
                mount(None, mp, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID)
            ro = True
        except (OSError, IndexError, UnicodeDecodeError) as e:
            errors["read_only_fs"] = str(e)
    layers["read_only_fs"] = ro
    # The interpreter's own trees under /tmp (a venv made with `mktemp -d`, as CI does) must stay
    # importable once the private /tmp hides them: hold them by O_PATH descriptors, then bind them
    # back, read-only, at the same paths inside the new /tmp.
    held = {}
    for path in _interpreter_paths_under("/tmp"):
        try:
            held[path] = os.open(path, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            errors[f"keep {path}"] = str(e)
    try:
        mount(b"tmpfs", "/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"size=64m,mode=0755")
        layers["private_tmp"] = True
    except OSError as e:
        errors["tmpfs /tmp"] = str(e)
    for path, fd in held.items():
        try:
            if layers["private_tmp"]:
                os.makedirs(path, mode=0o755, exist_ok=True)
                mount(f"/proc/self/fd/{fd}".encode(), path, None, _MS_BIND | _MS_REC)
                mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        except OSError as e:
            errors[f"keep {path}"] = str(e)
        finally:
            os.close(fd)
    for d in ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue"):
        if os.path.isdir(d):
            try:
                mount(b"tmpfs", d, b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"size=4k,mode=0755")
            except OSError as e:
                errors[f"tmpfs {d}"] = str(e)
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    try:
        if pidns:
            mount(b"proc", "/proc", b"proc", flags, b"hidepid=2")
        else:
            mount(b"tmpfs", "/proc", b"tmpfs", flags, b"size=4k,mode=0755")
        layers["private_proc"] = True
    except OSError as e:
        errors["/proc"] = str(e)


def _get_prctl(ctypes, libc):
    """libc's prctl (PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE), or None."""
    try:
        prctl = libc.prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        return prctl
    except Exception:
        return None


def _get_clear_caps(ctypes, libc):
    """A function that clears all capabilities of the calling process (capset(2)), or None."""
    try:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words, all zero
        capset = libc.capset

        def clear_caps():
            if capset(header, data) != 0:
                raise OSError(ctypes.get_errno(), "capset")

        return clear_caps
    except Exception:
        return None


def _forget_modules():
    """Drop ``_FORGOTTEN_MODULES`` from sys.modules and from the attributes of loaded modules. Programs
    cannot import them again (denied), and calls through a leftover ctypes function object raise the
    audited ctypes.call_function event."""
    gone = {k: m for k, m in sys.modules.items() if k.split(".")[0] in _FORGOTTEN_MODULES}
    for k in gone:
        del sys.modules[k]
    ids = {id(m) for m in gone.values()}
    for m in list(sys.modules.values()):
        d = getattr(m, "__dict__", None)
        if isinstance(d, dict):
            for k in [k for k, v in d.items() if id(v) in ids]:
                del d[k]


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

def _child(code, workdir, cfg, state):
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
        drop, prctl = state["drop"], state["prctl"]
        if drop is not None:
            uid, gid = drop
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)  # from root: clears every capability
        elif state["clear_caps"] is not None:
            # Root without the drop, or the worker's user namespace: no mount, no kill, no DAC override.
            state["clear_caps"]()
        if prctl is not None:
            # Die with the worker (a worker killed from outside must not leave orphans running).
            # Set after setuid, which clears it; the getppid check closes the race with its death.
            prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
            if os.getppid() != state["pid"]:
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
        for mod in (os, sys.modules.get("posix")):
            for name in _REMOVED_OS_FUNCS:
                mod.__dict__.pop(name, None)
        if cfg.get("audit_hook", True):  # off only in tests of the OS layers alone
            sys.addaudithook(_make_audit_hook(workdir, state["read_roots"]))
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


def _kill_all(pid, reaped, pid1):
    """SIGKILL the program ``pid`` (unless already reaped), its process group, and, when this worker is
    pid 1 of its own PID namespace, every other process in the namespace (kill(-1) from pid 1). A
    program that left its process group (setpgid is removed from os, but a fresh posix module has
    it) is thus still killed, and it cannot have children to leave behind (RLIMIT_NPROC)."""
    targets = [(os.killpg, pid)] + ([] if reaped else [(os.kill, pid)]) + ([(os.kill, -1)] if pid1 else [])
    for kill, target in targets:
        try:
            kill(target, 9)
        except OSError:
            pass


def _reap_strays():
    """pid 1 inherits every orphan of its namespace: reap those already dead."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _import_all(names, errors):
    for name in names:
        try:
            __import__(name)
        except ImportError as e:
            errors[f"preload {name}"] = str(e)
    _forget_modules()
    # Move everything imported so far out of the collector's reach: a collection in a program would
    # otherwise walk (and so copy-on-write) every preloaded object (0.7 -> 2 ms per program without).
    gc.collect()
    gc.freeze()


def run_one(code, timeout, state):
    cfg = state["cfg"]
    lazy = [name for name in state["lazy"] if name in code]
    if lazy:  # before the clock starts: the import is the worker's, not the program's
        state["lazy"] = [name for name in state["lazy"] if name not in lazy]
        _import_all(lazy, {})
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
        _child(code, workdir, cfg, state)
    os.close(w)
    try:
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    except OSError:
        pass
    status = _wait(pid, t0 + timeout)
    seconds = time.monotonic() - t0
    _kill_all(pid, status is not None, state["pid1"])  # on timeout, and any stray after a normal exit
    if status is None:
        os.waitpid(pid, 0)
    if state["pid1"]:
        _reap_strays()
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


def _stdlib_problem(drop):
    """Why the dropped user cannot import from the interpreter's stdlib (e.g. a pyenv under a 0700
    /root), or None. Then programs can import only the preloaded modules and what they imported."""
    uid, gid = drop
    path = os.path.dirname(os.__file__)
    parts = path.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i + 1]) or "/"
        try:
            st = os.stat(d)
        except OSError as e:
            return f"{d}: {e}"
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        need = 0o5 if d == path else 0o1  # read+search on the stdlib, search on its parents
        if (st.st_mode >> shift) & need != need:
            return (f"the interpreter's stdlib ({path}) is not readable by uid {uid} ({d} is mode "
                    f"{st.st_mode & 0o777:o}): programs can import only the preloaded modules")
    return None


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    cfg = json.loads(stdin.readline())
    layers = {"netns": False, "mountns": False, "pidns": False, "userns": False, "read_only_fs": False,
              "private_tmp": False, "private_proc": False}
    errors = {}
    ctypes, libc = _libc()
    prctl = _get_prctl(ctypes, libc) if libc is not None else None
    clear_caps = _get_clear_caps(ctypes, libc) if libc is not None else None
    if cfg["isolate"] and libc is not None:
        _unshare(ctypes, libc, cfg["private_tmp"], layers, errors)
        if layers["pidns"] and prctl is not None:
            _become_pid1(prctl)
        elif layers["pidns"]:  # no prctl: pid 1 could outlive the worker that sandbox.py kills
            layers["pidns"] = False
        if layers["mountns"]:  # never on the host's mounts
            _private_fs(ctypes, libc, layers["pidns"], layers, errors)
    elif cfg["isolate"]:
        errors["namespaces"] = "no ctypes/libc"
    if prctl is not None:
        prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: programs running as root (or in the userns) cannot ptrace it
    pid1 = layers["pidns"] and os.getpid() == 1
    del ctypes, libc
    _import_all(cfg["preload"], errors)
    lazy = []
    for name in cfg.get("lazy_preload", ()):
        if name in sys.modules or name in cfg["preload"]:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            lazy.append(name)
        else:
            errors[f"preload {name}"] = f"No module named {name!r}"
    vm_kib = _vm_size_kib()
    if vm_kib is not None and vm_kib // 1024 + 64 > cfg["memory_mb"]:
        errors["memory_mb"] = (f"memory_mb={cfg['memory_mb']} leaves programs no room: the worker already maps "
                               f"{vm_kib // 1024} MiB of address space (RLIMIT_AS counts it)")
    drop = None
    if os.geteuid() == 0 and cfg["drop_privileges"]:
        drop = _nobody()
        problem = _stdlib_problem(drop)
        if problem:
            errors["stdlib"] = problem
    root = tempfile.mkdtemp(prefix="carft_sandbox_", dir="/tmp" if layers["private_tmp"] else None)
    os.chmod(root, 0o711)
    state = {"cfg": cfg, "root": root, "n": 0, "drop": drop, "read_roots": _read_roots(), "prctl": prctl,
             "clear_caps": clear_caps, "pid": os.getpid(), "pid1": pid1, "lazy": lazy}
    layers.update({"audit_hook": cfg.get("audit_hook", True), "rlimits": True, "process_group": True,
                   "fresh_workdir": True, "minimal_env": True, "drop_privileges": drop is not None,
                   "uid": drop[0] if drop else os.geteuid(), "clear_caps": drop is None and clear_caps is not None,
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
