"""A pool of sandbox workers that run model-written ``solution()`` programs (python-style CoT).

Model-written code is hostile input (DESIGN.md Sec. 5). The pool starts ``workers`` long-lived
workers once; each builds its own isolation (docs/sandbox.md): a minimal read-only root holding only
the Python runtime, its stdlib and the allowed packages, entered with pivot_root; new user (when not
root), mount, PID, network, IPC, UTS and cgroup namespaces; a seccomp syscall filter; and a server,
pid 1 of its namespace, that never has ctypes or a process-spawning module in memory. Each program
runs in a child forked from the server, on a fresh tmpfs, with a wall-clock timeout, rlimits, as
``nobody`` when the trainer is root, and under an audit hook (a second layer). Anything a program
does yields None for that program; a worker that dies anyway is replaced. Where the kernel refuses
the namespaces, the pool refuses to start and says why, unless ``namespaces="if_available"``
(``reward.sandbox_insecure_allow_no_namespaces``) accepts the weak mode.

Unlike ReFT's pebble pool (created on every call, authors_code.md Sec. 6) the workers are reused
across calls, so the interpreter start-up is paid once.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import pkgutil
import select
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter, deque
from typing import NamedTuple, Sequence

from . import _sandbox_view

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_worker.py")
_START_TIMEOUT = 60.0  # seconds for a worker to start (imports of the preloaded modules)
_HANG_GRACE = 10.0  # a worker that overruns a job's timeout by this much is killed and replaced
_warned: set[str] = set()  # worker set-up problems already warned about (once per process)

DEFAULT_PRELOAD = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools",
                   "operator", "collections", "datetime", "random", "re", "string", "numbers", "heapq",
                   "bisect", "dataclasses", "typing", "enum", "copy", "time")
# Imported by a worker before the first program whose text mentions the name. ReFT's programs may use
# sympy (as a global, like math); importing it takes 0.4-0.6 s and grows the worker from 18 to 53 MiB,
# and fork() time grows with it: 0.7 -> 2.8 ms per program, 657 -> 266 programs/s with SVAMP's programs
# (2 workers, 2-core VM). Most programs never use it, so they keep the lean worker until one does.
DEFAULT_LAZY_PRELOAD = ("sympy",)
# Stdlib modules that every worker imports once under the programs' conditions (uid, root, rlimits,
# hook) before it reports ready: a root whose stdlib a program cannot read fails here, loudly.
PROBE_MODULES = ("textwrap", "csv", "array", "json", "struct", "binascii", "zlib", "unicodedata", "hashlib",
                 "pickle", "calendar", "pprint", "bz2", "lzma", "base64")
NAMESPACE_MODES = ("required", "if_available", "off")
# How a worker makes its root read-only: "auto" (mount_setattr, Linux 5.12+, else remounts) or
# "remount" (what Linux < 5.12 gets; set by a test to cover that path on a newer kernel).
_READ_ONLY_METHOD = "auto"
INSECURE_FIELD = "reward.sandbox_insecure_allow_no_namespaces"


class SandboxUnavailableError(RuntimeError):
    """The OS refused the isolation that python-style rewards need (and no weak mode was accepted)."""


def _warn_once(errors: dict) -> None:
    """Warn about what makes programs fail for reasons of the machine, not of the program."""
    for key, text in errors.items():
        if (key == "namespaces" or key.startswith("preload ") or key.startswith("package ")) and key not in _warned:
            _warned.add(key)
            if key == "namespaces":
                text = (f"running python-style rewards WITHOUT namespaces ({INSECURE_FIELD}): {text}; a program "
                        "that defeats the audit hook can read and write what the trainer's user can")
                warnings.warn(f"sandbox: {text}", RuntimeWarning, stacklevel=4)
            else:
                warnings.warn(f"sandbox: {key}: {text} (skipped; programs that need it score None and are "
                              "counted as sandbox errors)", RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=1)
def _host_modules() -> tuple[str, ...]:
    """Top-level modules the trainer's interpreter can import (to tell a module missing from the
    sandbox, a sandbox error, from one that does not exist, the program's error)."""
    names = set(sys.builtin_module_names)
    names.update(m.name for m in pkgutil.iter_modules())
    return tuple(sorted(names))


@functools.lru_cache(maxsize=1)
def _probe_modules() -> tuple[str, ...]:
    """The PROBE_MODULES that import in the trainer (a build without, say, lzma does not count)."""
    ok = []
    for name in PROBE_MODULES:
        try:
            importlib.import_module(name)
            ok.append(name)
        except ImportError:
            pass
    return tuple(ok)


_STATUSES = ("ok", "error", "timeout", "crashed", "rejected", "worker_died", "worker_hung", "sandbox_error")


class SandboxResult(NamedTuple):
    """Outcome of one program.

    Attributes:
        value: ``float(solution())`` when finite and numeric, else None.
        status: ``ok`` | ``error`` (exception, non-numeric result, denied operation) | ``timeout`` |
            ``crashed`` (killed by a signal / rlimit, or exited without a result) | ``rejected``
            (not a string, or too long) | ``worker_died`` | ``worker_hung`` | ``sandbox_error`` (the
            sandbox, not the program, made it fail: e.g. an installed module the root does not hold).
        detail: a short human-readable reason.
        seconds: wall-clock seconds the program ran.
    """

    value: float | None
    status: str
    detail: str
    seconds: float


def _minimal_env() -> dict[str, str]:
    # The workers (and so the programs) never see the trainer's environment (tokens, paths, ...).
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class _Worker:
    """One worker process and its line-buffered reply pipe."""

    def __init__(self, message: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", _WORKER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=_minimal_env(), cwd="/", close_fds=True, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.info: dict = {}
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._read_line(time.monotonic() + _START_TIMEOUT)
        if line is None:
            self.kill()
            raise RuntimeError(f"sandbox worker failed to start (exit code {self.proc.poll()})")
        self.info = json.loads(line)
        self.pid = self.proc.pid
        if not self.info.get("ready"):
            self.kill()
            fatal = self.info.get("fatal", "unknown reason")
            if self.info.get("refused"):
                raise SandboxUnavailableError(
                    f"sandbox: python-style rewards cannot isolate model-written programs on this machine: {fatal}. "
                    f"Or set {INSECURE_FIELD}=True (Sandbox(namespaces='if_available')) to run them with only the "
                    "audit hook, rlimits and the seccomp filter; a program that defeats the hook can then read "
                    f"and write whatever uid {os.geteuid()} can.")
            raise SandboxUnavailableError(f"sandbox: the worker could not start: {fatal}")
        _warn_once(self.info.get("errors", {}))
        if "memory_mb" in self.info.get("errors", {}):
            self.close()
            raise ValueError(self.info["errors"]["memory_mb"])

    def _read_line(self, deadline: float) -> bytes | None:
        """Block until a full reply line, EOF (None) or the deadline (None)."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def send(self, code: str, timeout: float) -> None:
        self.proc.stdin.write(json.dumps({"code": code, "timeout": timeout}).encode() + b"\n")
        self.proc.stdin.flush()

    def poll_reply(self) -> tuple[bytes | None, bool]:
        """Read what is available (the fd is readable). Returns (line or None, eof)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None, True
        self.buf += chunk
        if b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            return line, False
        return None, False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()  # the server and every program die with it (PDEATHSIG, then pid 1)
        except OSError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        # The weak mode's directory lives on the host's /tmp (the full mode's are tmpfs, gone with it).
        root = self.info.get("root")
        if root and not self.info.get("layers", {}).get("fresh_tmpfs") \
                and os.path.basename(root).startswith("carft_sandbox_"):
            from ._sandbox_server import _remove_tree  # no recursion: a program may nest deeply

            try:
                _remove_tree(root)
            except Exception:
                pass

    def close(self, wait: float = 2.0) -> None:
        try:
            self.proc.stdin.close()  # EOF: the server finishes its loop and exits, the worker with it
        except OSError:
            pass
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class Sandbox:
    """A reusable pool of sandbox workers.

    Args:
        workers: number of worker processes (programs run in parallel across them).
        timeout: default wall-clock seconds per program (ReFT: 10).
        cpu_seconds: RLIMIT_CPU per program.
        memory_mb: RLIMIT_AS per program, MiB (must exceed a worker's ~30 MiB address space).
        fsize_mb: RLIMIT_FSIZE per program, MiB.
        tmp_mb: size of each program's fresh tmpfs (its /tmp and working directory), MiB.
        preload: modules imported once per worker; ``math`` and ``sympy`` are also visible to programs
            as globals (ReFT prepends ``import math`` / ``import sympy``). A module that is not installed
            is skipped with a warning.
        lazy_preload: modules a worker imports before the first program whose text names them
            (default sympy: it makes every fork 2-3x slower, so workers load it only once needed).
        packages: installed (non-stdlib) packages that programs may import; only these are in the
            workers' root. Preloaded and lazily preloaded packages are added.
        namespaces: ``"required"`` (default): the full isolation, or refuse to start
            (``SandboxUnavailableError``) where the kernel does not allow it; ``"if_available"``: fall
            back to the weak mode there (``reward.sandbox_insecure_allow_no_namespaces``);
            ``"off"``: always the weak mode (tests). The weak mode has the audit hook, rlimits, the
            seccomp filter and ``nobody`` when root, but the host's filesystem and processes.
        seccomp: install the syscall filter (x86_64, aarch64; reported in ``layers``).
        max_program_chars: longer programs are rejected without running.
        audit_hook: install the audit hook in programs. Turn it off only to test the OS layers alone.
    """

    def __init__(self, workers: int = 2, timeout: float = 10.0, cpu_seconds: int = 5, memory_mb: int = 1024,
                 *, fsize_mb: int = 16, tmp_mb: int = 64, preload: Sequence[str] = DEFAULT_PRELOAD,
                 lazy_preload: Sequence[str] = DEFAULT_LAZY_PRELOAD,
                 packages: Sequence[str] = _sandbox_view.DEFAULT_PACKAGES, namespaces: str = "required",
                 seccomp: bool = True, max_program_chars: int = 100_000, audit_hook: bool = True):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if cpu_seconds < 1:
            raise ValueError(f"cpu_seconds must be >= 1, got {cpu_seconds}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
        if fsize_mb < 1:
            raise ValueError(f"fsize_mb must be >= 1, got {fsize_mb}")
        if tmp_mb < 1:
            raise ValueError(f"tmp_mb must be >= 1, got {tmp_mb}")
        if namespaces not in NAMESPACE_MODES:
            raise ValueError(f"namespaces must be one of {NAMESPACE_MODES}, got {namespaces!r}")
        if not sys.platform.startswith("linux"):
            raise SandboxUnavailableError("sandbox: python-style rewards need Linux (namespaces, seccomp)")
        self.timeout = float(timeout)
        self.max_program_chars = max_program_chars
        tops = [n.partition(".")[0] for n in (*preload, *lazy_preload)]
        pkgs = tuple(dict.fromkeys([*packages, *[t for t in tops if t not in sys.stdlib_module_names]]))
        plan = _sandbox_view.plan(sys.executable, pkgs)
        cfg = {"cpu_seconds": int(cpu_seconds), "memory_mb": int(memory_mb), "fsize_mb": int(fsize_mb),
               "tmp_mb": int(tmp_mb), "tmp_inodes": 16384, "preload": list(preload),
               "lazy_preload": list(lazy_preload), "audit_hook": bool(audit_hook), "seccomp": bool(seccomp),
               "read_only_method": _READ_ONLY_METHOD}
        self._message = {"cfg": cfg, "plan": plan, "namespaces": namespaces, "host_modules": list(_host_modules()),
                         "probe": list(_probe_modules())}
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._closed = False
        self._workers: list[_Worker] = []
        self._counts: Counter = Counter()
        self._errors: deque[str] = deque(maxlen=5)
        self.replaced = 0  # workers that died or hung and were restarted
        try:
            for _ in range(workers):
                self._workers.append(_Worker(self._message))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, reward_cfg, **kwargs) -> "Sandbox":
        """A pool sized by ``carft_mega.config.RewardConfig`` (sandbox_workers, _timeout, _cpu_seconds,
        _memory_mb, _insecure_allow_no_namespaces); ``kwargs`` override or add keyword arguments."""
        args = dict(workers=reward_cfg.sandbox_workers, timeout=reward_cfg.sandbox_timeout,
                    cpu_seconds=reward_cfg.sandbox_cpu_seconds, memory_mb=reward_cfg.sandbox_memory_mb,
                    namespaces="if_available" if getattr(reward_cfg, "sandbox_insecure_allow_no_namespaces", False)
                    else "required")
        args.update(kwargs)
        return cls(**args)

    # ------------------------------------------------------------------ introspection
    @property
    def worker_pids(self) -> list[int]:
        """Pids of the current workers (stable across calls unless a worker was replaced)."""
        return [w.pid for w in self._workers]

    @property
    def layers(self) -> dict:
        """Isolation layers a worker activated on this machine, and errors of the optional ones."""
        info = self._workers[0].info if self._workers else {}
        return {**info.get("layers", {}), "errors": info.get("errors", {})}

    def stats(self, reset: bool = True) -> dict:
        """Program outcomes since the last ``stats(reset=True)``: a count per status (``ok``, ``error``,
        ``timeout``, ``crashed``, ``rejected``, ``worker_died``, ``worker_hung``, ``sandbox_error``),
        ``sandbox_errors`` (programs that failed because of the sandbox, not of themselves: log these
        per step), ``replaced`` (workers restarted, in total) and up to 5 recent ``sandbox_error_details``.
        """
        with self._lock:
            out = {k: self._counts.get(k, 0) for k in _STATUSES}
            out.update(sandbox_errors=self._counts.get("sandbox_error", 0), replaced=self.replaced,
                       sandbox_error_details=list(self._errors))
            if reset:
                self._counts.clear()
                self._errors.clear()
        return out

    # ------------------------------------------------------------------ running
    def run_programs(self, programs: Sequence[str], timeout: float | None = None) -> list[float | None]:
        """Run each program's ``solution()``; value when it returns a finite number, else None.

        Args:
            programs: full program texts (``templates.program_from_generation``).
            timeout: wall-clock seconds per program (default: the pool's).

        Returns:
            One value per program, in input order.
        """
        return [r.value for r in self.run_programs_detailed(programs, timeout)]

    def run_programs_detailed(self, programs: Sequence[str], timeout: float | None = None) -> list[SandboxResult]:
        """``run_programs`` with the status, reason and run time of every program."""
        timeout = self.timeout if timeout is None else float(timeout)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        results: list[SandboxResult | None] = [None] * len(programs)
        queue: deque[int] = deque()
        for i, p in enumerate(programs):
            if not isinstance(p, str):
                results[i] = SandboxResult(None, "rejected", f"not a string: {type(p).__name__}", 0.0)
            elif len(p) > self.max_program_chars:
                results[i] = SandboxResult(None, "rejected", f"{len(p)} chars > {self.max_program_chars}", 0.0)
            else:
                queue.append(i)
        retried: set[int] = set()
        with self._lock:
            self._check_usable()
            idle = list(range(len(self._workers)))
            busy: dict[int, tuple[int, float]] = {}  # worker slot -> (program index, hang deadline)
            while queue or busy:
                while idle and queue:
                    slot, i = idle.pop(), queue.popleft()
                    if not self._workers[slot].alive():
                        self._replace(slot)
                    try:
                        self._workers[slot].send(programs[i], timeout)
                    except OSError:  # the worker died while idle: restart it, retry the program
                        self._replace(slot)
                        queue.appendleft(i)
                        idle.append(slot)
                        continue
                    busy[slot] = (i, time.monotonic() + timeout + _HANG_GRACE)
                if not busy:
                    continue
                fds = {self._workers[s].fd: s for s in busy}
                wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
                readable, _, _ = select.select(list(fds), [], [], wait)
                for fd in readable:
                    slot = fds[fd]
                    i, _ = busy[slot]
                    try:
                        line, eof = self._workers[slot].poll_reply()
                    except OSError:
                        line, eof = None, True
                    if line is not None:
                        results[i] = self._parse_reply(line)
                    elif eof:
                        # A program cannot reach its worker (separate process, other uid, pid 1 of
                        # its PID namespace), so this is an outside event: run the program once more on a fresh worker.
                        self._replace(slot)
                        if i in retried:
                            results[i] = SandboxResult(None, "worker_died", "the worker exited twice", 0.0)
                        else:
                            retried.add(i)
                            queue.appendleft(i)
                    else:
                        continue  # partial line
                    del busy[slot]
                    idle.append(slot)
                now = time.monotonic()
                for slot in [s for s, (_, d) in busy.items() if d <= now]:
                    i, _ = busy.pop(slot)
                    results[i] = SandboxResult(None, "worker_hung", "no reply; worker restarted", timeout)
                    self._replace(slot)
                    idle.append(slot)
            for r in results:
                self._counts[r.status] += 1
                if r.status == "sandbox_error":
                    self._errors.append(r.detail)
        return results  # type: ignore[return-value]

    @staticmethod
    def _parse_reply(line: bytes) -> SandboxResult:
        try:
            r = json.loads(line)
            value = r["value"]
            if value is not None:
                value = float(value)
            return SandboxResult(value, str(r["status"]), str(r["detail"]), float(r["seconds"]))
        except (ValueError, KeyError, TypeError):
            return SandboxResult(None, "sandbox_error", "malformed worker reply", 0.0)

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._message)
        self.replaced += 1

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the sandbox is closed")
        if os.getpid() != self._owner:
            raise RuntimeError("a Sandbox cannot be used from a forked copy of its process; create one per process")

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        for w in self._workers:
            w.close()
        self._workers = []

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process-wide pool used by the module-level ``run_programs`` (created on first use)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed or _default._owner != os.getpid():
            _default = Sandbox(workers=max(1, min(4, os.cpu_count() or 1)))
            atexit.register(_default.close)
        return _default


def set_default_sandbox(sandbox: Sandbox | None) -> None:
    """Use ``sandbox`` (e.g. built from ``RewardConfig``) for the module-level helpers."""
    global _default
    with _default_lock:
        _default = sandbox


def run_programs(programs: Sequence[str], timeout: float | None = None) -> list[float | None]:
    """``Sandbox.run_programs`` on the shared default pool."""
    return default_sandbox().run_programs(programs, timeout)
