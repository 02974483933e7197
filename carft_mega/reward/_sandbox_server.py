"""Sandbox server: runs model-written ``solution()`` programs, one forked child per program.

``_sandbox_worker.py`` execs this file's text as ``python -I -S -B -c <text>`` inside the worker's
isolation (see docs/sandbox.md): a minimal root, new user (when not root), mount, PID, network, IPC,
UTS and cgroup namespaces, a seccomp filter and no_new_privs. It is pid 1 of its PID namespace. It
never imports ctypes or any module that can start a process or open a socket, so that nothing of the
kind is in the memory that programs inherit: sympy's ``from ctypes import c_long, sizeof`` and
``import subprocess`` are answered by stub modules, and a meta-path guard refuses the rest.

Protocol: fd 3 carries one JSON line with the configuration from the worker (then, in the full mode,
one byte per fresh tmpfs: ``k``, or ``e<reason>\\n``); the server asks for a tmpfs with ``m`` on fd 4.
stdin carries job lines ``{"code", "timeout"}``; stdout gets one ready line and then one
``{"value", "status", "detail", "seconds"}`` line per job. EOF on stdin ends the server.

Per program (a forked child): its own process group; stdin/stdout/stderr on /dev/null, every other fd
closed but the result pipe; a fresh tmpfs as /tmp and working directory (weak mode: a fresh directory,
removed without recursion afterwards); rlimits (CPU, address space, file size, no processes or
threads, 64 fds, no core); ``nobody`` when the trainer is root; an empty environment; the process and
signal functions removed from ``os``/``posix``, ``_imp.create_builtin`` deleted (no fresh ``posix``);
then the audit hook (which lets ``marshal.loads`` through only for the import system's own ``.pyc``
reads from the read-only runtime). After it ends, the server, as pid 1, kills every process left in
its namespace.
"""

import errno
import gc
import json
import os
import resource
import select
import sys
import time
import types

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
    "code.__new__", "function.__new__", "marshal.load",
    "_thread.start_new_thread", "cpython.PyInterpreterState_New",
    "cpython.run_command", "cpython.run_file", "cpython.run_module", "cpython.run_stdin",
    "shutil.chown", "shutil.rmtree", "os.chroot", "os.truncate", "webbrowser.open", "syslog.openlog",
    "winreg.OpenKey",
})
# Modules whose import is denied (top-level name): FFI, processes, sockets, shared memory, terminals,
# interpreter internals. The OS stops them anyway (their extension modules are empty files in the
# root, the syscalls are filtered); the hook makes the refusal explicit. Pure-Python modules that
# the stdlib itself imports (importlib, threading, pathlib, ...) are allowed: denying them broke
# legitimate imports (inspect needs importlib.machinery), and the OS fences what they can do.
_DENY_IMPORTS = frozenset({
    "ctypes", "_ctypes", "_ctypes_test", "_posixsubprocess", "subprocess", "socket", "_socket", "ssl", "_ssl",
    "multiprocessing", "_multiprocessing", "_posixshmem", "mmap", "fcntl", "pty", "termios", "resource",
    "asyncio", "_asyncio", "http", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib",
    "webbrowser", "xmlrpc", "socketserver", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
    "_interpchannels", "_interpqueues", "_testcapi", "_testlimitedcapi",
    "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testclinic", "_xxtestfuzz", "faulthandler",
    "tracemalloc", "_tracemalloc", "signal", "_signal", "sqlite3", "_sqlite3", "cffi", "_cffi_backend",
    "syslog", "readline", "curses", "_curses", "tkinter", "_tkinter",
})
# Removed from os/posix in every program: process creation, signals, process groups, identity changes.
_REMOVED_OS_FUNCS = ("kill", "killpg", "pidfd_open", "setpgid", "setpgrp", "setsid", "tcsetpgrp", "fork",
                     "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                     "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                     "spawnle", "spawnlp", "spawnlpe", "system", "popen", "setns", "unshare",
                     "register_at_fork", "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid",
                     "setregid", "setresgid", "setgroups", "_fork_exec")
# Dropped from sys.modules after the preload, with every attribute that points at them.
_FORGOTTEN_MODULES = ("ctypes", "_ctypes", "signal", "_signal", "subprocess", "_posixsubprocess")
# Extension modules the server itself never loads (the root has them as empty files anyway; in the weak
# mode this guard is what keeps them out of the memory that programs inherit).
_NEVER_LOAD = frozenset({"_ctypes", "_posixsubprocess", "_socket", "_ssl", "mmap", "_multiprocessing",
                         "_posixshmem", "fcntl", "termios", "_xxsubinterpreters", "_xxinterpchannels",
                         "_interpreters", "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi",
                         "_testlimitedcapi", "_cffi_backend"})
# Path-taking events allowed only inside the working directory (and without dir_fd).
_WORKDIR_EVENTS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.rename"})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir"})
_SETATTR_EVENTS = frozenset({"object.__setattr__", "object.__delattr__"})
_PROTECTED_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__", "__globals__", "__closure__",
                              "__builtins__", "__dict__"})
_GLOBAL_MODULES = ("math", "sympy")

# sympy does ``from ctypes import c_long, sizeof`` (sympy.external.gmpy, to size a C long) and
# ``import subprocess`` (printing.gtk, printing.preview); these stand in for both. Each runs in its own
# module namespace, so nothing of the server is reachable through its functions.
_STUBS = {
    "ctypes": (
        "import struct as _struct\n"
        "class c_long:\n"
        "    '''Stand-in: only sizeof(c_long) works.'''\n"
        "def sizeof(t):\n"
        "    if t is c_long:\n"
        "        return _struct.calcsize('l')\n"
        "    raise PermissionError('sandbox: ctypes is not available')\n"),
    "subprocess": (
        "class _Denied(Exception):\n"
        "    def __new__(cls, *args, **kwargs):\n"
        "        raise PermissionError('sandbox: subprocess is not available')\n"
        "def __getattr__(name):\n"
        "    if name.startswith('__'):\n"
        "        raise AttributeError(name)\n"
        "    return _Denied\n"),
}


def _make_audit_hook(workdir, read_roots):
    """Build the audit hook (the second layer; the OS is the wall). Everything it uses is bound as a
    positional default: a program cannot redirect it by monkeypatching a module or builtins, replacing
    ``__defaults__`` raises ``object.__setattr__`` (denied), and the defaults tuple and every value in
    it are immutable.

    ``marshal.loads`` (crafted bytecode runs past the code/function constructors) is allowed only for
    what the import system reads from the read-only runtime: the caller is importlib's
    ``_compile_bytecode`` called from ``SourceLoader.get_code``, whose ``bytecode_path`` is a ``.pyc``
    inside the read roots, and the bytes are that file's, read again here (through the original
    ``_io.FileIO``): whatever a program patches in importlib, only genuine bytecode loads."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    ext = sys.modules["_frozen_importlib_external"]
    pyc = (ext._compile_bytecode.__code__, ext.SourceLoader.get_code.__code__, sys._getframe,
           sys.modules["_io"].FileIO, bytes)

    def norm(p, _cwd=workdir, _str=str, _bytes=bytes, _type=type):
        # Lexical normalisation against the fixed cwd (os.chdir is denied); a ".." anywhere is refused
        # (None), so that a symlink on the way cannot take a checked path elsewhere.
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
                return None
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
             _read=(workdir,) + tuple(read_roots), _runtime=tuple(read_roots), _pyc=pyc, _Err=PermissionError,
             _int=int, _type=type, _str=str, _none=None, _wflags=write_flags):
        if event in _deny:
            raise _Err(f"sandbox: {event} is not allowed")
        if event == "marshal.loads":
            cb_code, gc_code, getframe, file_io, bytes_ = _pyc
            f1 = getframe(1)
            f2 = f1.f_back
            if f1.f_code is cb_code and f2 is not None and f2.f_code is gc_code:
                path = f2.f_locals.get("bytecode_path")
                if _type(path) is _str and path.endswith(".pyc") and _inside(_norm(path), _runtime):
                    try:
                        with file_io(path) as f:
                            genuine = f.read()[16:]  # after the 16-byte pyc header
                    except OSError:
                        genuine = None
                    if genuine is not None and bytes_(args[0]) == genuine:
                        return
            raise _Err("sandbox: marshal.loads is not allowed")
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
            # The hook's helpers are reachable through the frame of a refused call in a traceback;
            # rewiring them (their __defaults__ hold the working directory) is refused. A program's
            # own functions (namedtuple sets __new__.__defaults__) are its business.
            if args[1] in _protected and (args[0] is _norm or args[0] is _inside):
                raise _Err(f"sandbox: setting {args[1]} is not allowed")
        elif event in _read_events:
            path = args[0]
            if path is _none:
                return
            if _type(path) is not _int and not _inside(_norm(path), _read):
                raise _Err(f"sandbox: {event} outside the working directory")

    return hook


# --------------------------------------------------------------------------------------- set-up

class _Guard:
    """Meta-path finder that refuses ``_NEVER_LOAD`` for the server's own imports (preloads)."""

    @staticmethod
    def find_spec(name, path=None, target=None, _never=_NEVER_LOAD, _Err=ImportError):
        if name.partition(".")[0] in _never:  # (defaults: a program's globals-free child still has them)
            raise _Err(f"sandbox: {name} is never loaded", name=name)
        return None


def _install_stubs():
    for name, src in _STUBS.items():
        if name not in sys.modules:
            mod = types.ModuleType(name, f"sandbox stand-in for {name}")
            exec(src, mod.__dict__)
            sys.modules[name] = mod


def _forget_modules():
    """Drop ``_FORGOTTEN_MODULES`` from sys.modules and from the attributes of loaded modules."""
    gone = {k: m for k, m in sys.modules.items() if k.split(".")[0] in _FORGOTTEN_MODULES}
    for k in gone:
        del sys.modules[k]
    ids = {id(m) for m in gone.values()}
    for m in list(sys.modules.values()):
        d = getattr(m, "__dict__", None)
        if isinstance(d, dict):
            for k in [k for k, v in d.items() if id(v) in ids]:
                del d[k]


def _scrub():
    """Remove every reference to a process or signal function of ``posix`` held outside os/posix
    (module globals such as ``os.supports_fd`` members, ``from os import ...`` bindings), so that
    deleting the names from os/posix in a program leaves none behind. Runs before ``gc.freeze``."""
    posix = sys.modules["posix"]
    fns = [posix.__dict__[n] for n in _REMOVED_OS_FUNCS if n in posix.__dict__]
    keep = (posix.__dict__, os.__dict__)
    for fn in fns:
        for ref in gc.get_referrers(fn):
            if any(ref is k for k in keep):
                continue
            if isinstance(ref, dict):
                for k in [k for k, v in ref.items() if v is fn]:
                    ref[k] = None
            elif isinstance(ref, set):
                ref.discard(fn)
            elif isinstance(ref, list):
                ref[:] = [v for v in ref if v is not fn]


def _import_all(names, errors):
    _install_stubs()
    for name in names:
        try:
            __import__(name)
        except ImportError as e:
            errors[f"preload {name}"] = str(e)
    _forget_modules()
    _scrub()
    # Move everything imported so far out of the collector's reach: a collection in a program would
    # otherwise walk (and so copy-on-write) every preloaded object (0.7 -> 2 ms per program without).
    gc.collect()
    gc.freeze()


# --------------------------------------------------------------------------------------- one program

def _sandbox_caused(e, host_modules, denied, read_roots):
    """Whether exception ``e`` of a program comes from the sandbox (a module installed on the host that
    the root lacks or cannot load, a runtime file it cannot read), not from the program."""
    if isinstance(e, ImportError):
        top = (e.name or "").partition(".")[0]
        if not top or top in denied:
            return False
        if isinstance(e, ModuleNotFoundError):
            return top in host_modules
        msg = str(e)
        return any(s in msg for s in ("shared object", "invalid ELF", "Permission denied", "undefined symbol"))
    if isinstance(e, PermissionError) and not str(e).startswith("sandbox:"):
        name = e.filename if isinstance(e.filename, str) else ""
        return any(name == r or name.startswith(r + "/") for r in read_roots)
    return False


def _child(code, workdir, cfg, state):
    """Runs in the forked child; never returns (os._exit)."""
    write, _exit = os.write, os._exit
    try:
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(_RESULT_FD + 1, 1 << 16)  # the server's pipes and everything else
        os.umask(0o077)
        cpu = int(cfg["cpu_seconds"])
        limits = [(resource.RLIMIT_CPU, cpu, cpu + 1),
                  (resource.RLIMIT_AS, cfg["memory_mb"] * _MiB, cfg["memory_mb"] * _MiB),
                  (resource.RLIMIT_FSIZE, cfg["fsize_mb"] * _MiB, cfg["fsize_mb"] * _MiB),
                  (resource.RLIMIT_NPROC, 0, 0),  # no fork, no threads (not root: see the drop)
                  (resource.RLIMIT_NOFILE, 64, 64),  # also far below the exec fd of the seccomp filter
                  (resource.RLIMIT_CORE, 0, 0)]
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        drop = state["drop"]
        if drop is not None:
            uid, gid = drop
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)  # from root: clears every capability
        os.chdir(workdir)  # after the drop: the directory is the program's own (0700)
        # Backstop for the weak mode (no PID namespace): a program orphaned by a dead server still ends.
        sig = state["signal"]
        sig.alarm(int(state["alarm"]))
        for name in ("pidfd_send_signal", "pthread_kill"):
            sig.__dict__.pop(name, None)
        os.environ.clear()
        # Bind what the epilogue needs before the program can touch modules or builtins.
        isfinite, repr_, float_ = __import__("math").isfinite, repr, float
        bool_, str_, bytes_, BaseException_ = bool, str, bytes, BaseException
        caused, host, denied, roots = _sandbox_caused, state["host_modules"], state["denied"], state["read_roots"]
        namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        for name in _GLOBAL_MODULES:  # ReFT prepends "import math" and "import sympy" to every program
            if name in sys.modules:
                namespace[name] = sys.modules[name]
        # Nothing of the server, no process or signal function, no way to a fresh posix.
        for mod in (os, sys.modules.get("posix")):
            for name in _REMOVED_OS_FUNCS:
                mod.__dict__.pop(name, None)
        for name in ("supports_fd", "supports_dir_fd", "supports_follow_symlinks", "supports_effective_ids"):
            getattr(os, name, set()).clear()
        # No fresh instance of a builtin module (a new posix would have fork/exec/kill again). Every
        # builtin is already loaded. (get_frozen_object's data argument raises marshal.loads: denied.)
        sys.modules["_imp"].__dict__.pop("create_builtin", None)
        for name in ("__main__", "_signal", "signal"):
            sys.modules.pop(name, None)
        sys.dont_write_bytecode = True
        hook = _make_audit_hook(workdir, roots) if cfg.get("audit_hook", True) else None
        addaudithook = sys.addaudithook
        # The server's state is the child's copy: empty it (pipes, the signal module). What a program
        # walking up its frames still finds, the server's functions and configuration, holds no
        # capability: its descriptors are closed, os has no process functions, there is no ctypes.
        # (Emptying the globals too cost 1 ms per program, a third of a program's CPU time: every
        # function freed is a copy-on-write page fault.)
        state.clear()
        if hook is not None:  # off only in tests of the OS layers alone
            addaudithook(hook)
    except BaseException as e:
        try:
            write(3, f"Ssetup failed: {type(e).__name__}: {e}"[:4096].encode())
        finally:
            _exit(1)
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
                if caused(e, host, denied, roots):
                    msg = f"S{type(e).__name__}: {e} (the host has it; the sandbox's root does not serve it)"
                else:
                    msg = f"N{type(e).__name__}: {e}"
                msg = msg[:300].encode("utf-8", "replace")
            except BaseException_:
                msg = b"Nexception"
        write(_RESULT_FD, msg)
    except BaseException:
        pass
    _exit(0)



def _wait(pid, r, deadline):
    """Read the result pipe ``r`` until EOF and wait for ``pid``, until ``deadline`` (monotonic).
    Returns (wait status or None on timeout, data)."""
    data, eof, delay = b"", False, 0.0001
    while True:
        left = deadline - time.monotonic()
        if not eof:
            if left <= 0 or not select.select([r], [], [], left)[0]:
                return None, data
            chunk = os.read(r, _MAX_RESULT_BYTES)
            if chunk:
                data = (data + chunk)[:_MAX_RESULT_BYTES + 1]
                continue
            eof = True  # the child is exiting (or closed its pipe early): wait for it
            for _ in range(64):  # it becomes a zombie right after its files close: yield, do not sleep
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return status, data
                os.sched_yield()
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, data
        if left <= 0:
            return None, data
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.01)


def _kill_all(pid, reaped, pid1):
    """SIGKILL the program ``pid`` (unless already reaped), its process group, and, when this server
    is pid 1 of its own PID namespace, every other process in the namespace (kill(-1) from pid 1)."""
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


def _remove_tree(top):
    """Delete directory ``top`` without recursion (weak mode): any depth, any permissions the owner
    can change back, bounded descriptors. Moves the entries of nested directories up into ``top``
    until only files are left. Returns None, or the reason it failed (reported as a sandbox error)."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        return None if e.errno == errno.ENOENT else str(e)
    n, token = 0, os.urandom(6).hex()
    try:
        os.chmod(fd, 0o700)
        while True:
            dirs = []
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=fd)
            if not dirs:
                break
            for name in dirs:
                try:
                    os.rmdir(name, dir_fd=fd)
                    continue
                except OSError:
                    pass
                os.chmod(name, 0o700, dir_fd=fd)  # a directory (scandir said so) its owner may open
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    with os.scandir(sub) as it:
                        inner = [e.name for e in it]
                    for child in inner:
                        n += 1
                        os.rename(child, f".{token}{n}", src_dir_fd=sub, dst_dir_fd=fd)
                finally:
                    os.close(sub)
        os.close(fd)
        fd = -1
        os.rmdir(top)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if fd >= 0:
            os.close(fd)
    return None


def _fresh_workdir(state):
    """A new, empty working directory for the next program: a fresh tmpfs from the worker (full mode)
    or a new directory (weak mode). Returns (path, error)."""
    if state["ctl"] is None:
        try:
            state["n"] += 1  # and a random part: a program cannot pre-create the next program's directory
            path = os.path.join(state["root"], f"p{state['n']}_{os.urandom(8).hex()}")
            os.mkdir(path, 0o700)
            if state["drop"] is not None:
                os.chown(path, *state["drop"])
            return path, None
        except OSError as e:
            return None, f"work directory: {e}"
    if state["reuse"]:
        return state["workdir"], None
    if not state["pending"]:
        os.write(state["ctl"][1], b"m")
    state["pending"] = False
    reply = os.read(state["ctl"][0], 1)
    if reply == b"k":
        state["fresh"] = _tmpfs_state(state["workdir"])
        return state["workdir"], None
    rest = b""
    while reply and not rest.endswith(b"\n"):
        chunk = os.read(state["ctl"][0], 1)
        if not chunk:
            break
        rest += chunk
    return None, "fresh tmpfs: " + (rest.decode("utf-8", "replace").strip() or "the worker is gone")


def _tmpfs_state(path):
    """What a program can change in its tmpfs: the root directory's metadata (mode, owner, links,
    times: creating, removing, chmod, setxattr all touch its ctime) and the inodes and blocks in use."""
    st, vfs = os.stat(path), os.statvfs(path)
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns,
            vfs.f_files - vfs.f_ffree, vfs.f_blocks - vfs.f_bfree)


def _after_program(state, workdir):
    """Clean up after a program. Full mode: a tmpfs the program left exactly as it was mounted (most
    programs write nothing) serves the next one; otherwise ask for a fresh one now (the worker mounts
    it while the reply goes out). Weak mode: remove the directory."""
    if state["ctl"] is not None:
        try:
            state["reuse"] = _tmpfs_state(workdir) == state["fresh"]
        except OSError:
            state["reuse"] = False
        if not state["reuse"]:
            os.write(state["ctl"][1], b"m")
            state["pending"] = True
        return None
    return _remove_tree(workdir)


def run_one(code, timeout, state):
    cfg = state["cfg"]
    lazy = [name for name in state["lazy"] if name in code]
    if lazy:  # before the clock starts: the import is the server's, not the program's
        state["lazy"] = [name for name in state["lazy"] if name not in lazy]
        errs = {}
        _import_all(lazy, errs)
        state["lazy_errors"].update(errs)
    for name, why in state["lazy_errors"].items():
        if name.split(" ", 1)[1] in code:
            return {"value": None, "status": "sandbox_error", "detail": f"{name}: {why}", "seconds": 0.0}
    workdir, err = _fresh_workdir(state)
    if err:
        return {"value": None, "status": "sandbox_error", "detail": err, "seconds": 0.0}
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)  # r may be fd 3; after this fd 3 is free or already is w
        if w != _RESULT_FD:
            os.dup2(w, _RESULT_FD)
        state["alarm"] = timeout + 5
        _child(code, workdir, cfg, state)
    os.close(w)
    try:
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    except OSError:
        pass
    status, data = _wait(pid, r, t0 + timeout)
    seconds = time.monotonic() - t0
    _kill_all(pid, status is not None, state["pid1"])  # on timeout, and any stray after a normal exit
    if status is None:
        os.waitpid(pid, 0)
    if state["pid1"]:
        _reap_strays()
    os.close(r)
    cleanup_error = _after_program(state, workdir)
    if cleanup_error:
        state["cleanup_errors"] += 1
    if status is None:
        return {"value": None, "status": "timeout", "detail": f"wall clock > {timeout:g} s", "seconds": seconds}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        what = {9: "SIGKILL", 24: "SIGXCPU (cpu limit)", 25: "SIGXFSZ (file size limit)", 11: "SIGSEGV",
                14: "SIGALRM"}.get(sig, "")
        return {"value": None, "status": "crashed", "detail": f"signal {sig} {what}".strip(), "seconds": seconds}
    if data.startswith(b"V") and b"\n" not in data and len(data) <= _MAX_RESULT_BYTES:
        try:
            value = float(data[1:].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            value = None
        if value is not None and value == value and abs(value) != float("inf"):
            return {"value": value, "status": "ok", "detail": "", "seconds": seconds}
        return {"value": None, "status": "error", "detail": "malformed result", "seconds": seconds}
    if data[:1] in (b"N", b"S"):
        status_name = "error" if data[:1] == b"N" else "sandbox_error"
        return {"value": None, "status": status_name, "detail": data[1:].decode("utf-8", "replace"),
                "seconds": seconds}
    return {"value": None, "status": "crashed", "detail": f"exit status {os.waitstatus_to_exitcode(status)}, no result",
            "seconds": seconds}


def _probe(state, modules):
    """Run a program that imports ``modules`` (stdlib modules the trainer can import) under the
    programs' conditions. Returns None, or why the sandbox cannot serve programs."""
    code = "".join(f"import {m}\n" for m in modules) + "def solution():\n    return 1.0\n"
    res = run_one(code, 30.0, state)
    if res["status"] == "ok" and res["value"] == 1.0:
        return None
    return f"{res['status']}: {res['detail']}"


def _vm_size_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_line(fd):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return buf


def main():
    # fd 3: config (and tmpfs replies) from the worker; fd 4: tmpfs requests (full mode).
    cfg_fd = os.dup(3)
    os.close(3)
    setup = json.loads(_read_line(cfg_fd))
    cfg, layers, errors = setup["cfg"], setup["layers"], setup["errors"]
    if setup["full"]:
        ctl_w = os.dup(4)
        os.close(4)
        ctl = (cfg_fd, ctl_w)
    else:
        os.close(cfg_fd)
        ctl = None
    sys.path[:] = setup["sys_path"]
    sig = sys.modules["_signal"]  # builtin; as pid 1, a signal at SIG_DFL cannot be sent from inside the namespace
    sig.signal(sig.SIGINT, sig.SIG_DFL)  # Python installed a handler (KeyboardInterrupt)
    sys.meta_path.insert(0, _Guard)
    _install_stubs()
    # Every builtin module now: programs cannot create one later (_imp.create_builtin is deleted in them).
    builtins_ = [n for n in sys.builtin_module_names
                 if n not in _NEVER_LOAD and n not in ("_tracemalloc", "faulthandler")]
    _import_all(builtins_ + list(cfg["preload"]), errors)
    lazy = [n for n in cfg.get("lazy_preload", ()) if n not in sys.modules and n not in cfg["preload"]]
    vm_kib = _vm_size_kib()
    if vm_kib is not None and vm_kib // 1024 + 64 > cfg["memory_mb"]:
        errors["memory_mb"] = (f"memory_mb={cfg['memory_mb']} leaves programs no room: the worker already maps "
                               f"{vm_kib // 1024} MiB of address space (RLIMIT_AS counts it)")
    drop = tuple(setup["drop"]) if setup["drop"] else None
    root = setup["workdir"]
    if ctl is None:
        root = f"/tmp/carft_sandbox_{os.getpid()}_{os.urandom(6).hex()}"
        os.mkdir(root, 0o711)
        os.chmod(root, 0o711)
    state = {"cfg": cfg, "root": root, "workdir": setup["workdir"], "n": 0, "drop": drop, "ctl": ctl,
             "pending": False, "reuse": False, "fresh": None,
             "pid1": layers.get("pidns", False) and os.getpid() == 1, "lazy": lazy,
             "lazy_errors": {}, "host_modules": frozenset(setup["host_modules"]),
             "denied": _DENY_IMPORTS | frozenset(setup["hidden"]), "read_roots": tuple(setup["read_roots"]),
             "cleanup_errors": 0, "signal": sig}
    del sig
    fatal = None
    probe = [m for m in setup["probe"] if m not in sys.modules]  # the loaded ones would prove nothing
    if "memory_mb" not in errors:
        problem = _probe(state, probe)
        if problem:
            fatal = (f"a probe program importing {', '.join(probe)} failed inside the sandbox as uid "
                     f"{drop[0] if drop else os.getuid()} ({problem}); is the interpreter ({setup['exe']}) "
                     "and its standard library readable by that uid?")
    layers.update({"audit_hook": cfg.get("audit_hook", True), "rlimits": True, "process_group": True,
                   "fresh_workdir": True, "minimal_env": True, "drop_privileges": drop is not None,
                   "uid": drop[0] if drop else os.geteuid(), "server_has_ctypes": "_ctypes" in sys.modules})
    ready = {"ready": fatal is None, "pid": os.getpid(), "root": root, "layers": layers, "errors": errors}
    if fatal:
        ready["fatal"] = fatal
    out = sys.stdout.buffer
    out.write(json.dumps(ready).encode() + b"\n")
    out.flush()
    if fatal:
        return
    try:
        for line in sys.stdin.buffer:
            job = json.loads(line)
            try:
                res = run_one(job["code"], float(job["timeout"]), state)
            except Exception as e:  # a server-side failure: report, keep serving
                res = {"value": None, "status": "sandbox_error", "detail": f"{type(e).__name__}: {e}", "seconds": 0.0}
            out.write(json.dumps(res).encode() + b"\n")
            out.flush()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        if ctl is None:
            _remove_tree(root)


if __name__ == "__main__":
    main()
