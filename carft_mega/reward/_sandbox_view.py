"""What a sandbox worker's root contains: the plan that ``_sandbox_worker.py`` mounts.

Computed once per trainer process (it runs the dynamic loader in list mode on the interpreter and its
extension modules) and sent to every worker. The root holds, read-only, only:
  * the interpreter binary, its program interpreter (ld.so), the shared libraries that it and the
    allowed extension modules load (as the loader resolves them here, ``ld.so --list``), and
    ``/etc/ld.so.cache``, which the loader reads to find them;
  * the standard library, with its ``site-packages`` replaced by an empty directory and the extension
    modules programs must never load (sockets, ctypes, subprocess, mmap, ...) replaced by empty files;
  * the packages programs may import (sympy and mpmath by default), each at its own path;
  * /dev/null, /dev/zero and /dev/urandom, and an empty /tmp where each program gets a fresh tmpfs.
Path components that are symlinks on the host (``/lib -> usr/lib``) are recreated as symlinks, so
every path resolves inside the root as it does outside; directories on the way (``/root``, a 0700
``mktemp -d``) are new, empty and 0755, so an unprivileged program can reach the interpreter that a
root-only directory hides on the host. Nothing else of the host is there: no /etc, /home, /proc,
/sys, /run, no sockets, no data.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import stat
import subprocess
import sys
import sysconfig

# Extension modules of the stdlib that are replaced by empty files in the root: a program cannot load
# them even if it gets past the audit hook (the import then fails with "invalid ELF header"), and the
# server never loads them either, so no copy is in memory (``_imp.create_dynamic`` would find one).
HIDDEN_EXTENSIONS = frozenset({
    "_ctypes", "_ctypes_test", "_posixsubprocess", "_socket", "_ssl", "mmap", "_multiprocessing",
    "_posixshmem", "fcntl", "termios", "_asyncio", "syslog", "_xxsubinterpreters", "_xxinterpchannels",
    "_interpreters", "_interpchannels", "_interpqueues", "_testlimitedcapi", "_testexternalinspection",
    "_xxtestfuzz", "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
    "_testimportmultiple", "_testclinic", "_testsinglephase", "xxlimited", "xxlimited_35", "_tkinter",
    "_curses", "_curses_panel", "readline", "nis", "spwd", "ossaudiodev", "_sqlite3", "_dbm", "_gdbm",
    "_crypt",
})
DEFAULT_PACKAGES = ("sympy", "mpmath")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
WORKDIR = "/tmp"  # each program's fresh tmpfs, and its working directory
# A runtime that lives under the host's /tmp (CI's `mktemp -d` venv) appears under this directory
# instead: /tmp in the root is always the program's own tmpfs.
TMP_ALIAS = "/.host_tmp"


def _alias(path: str) -> str:
    return TMP_ALIAS + path if path == "/tmp" or path.startswith("/tmp/") else path


def _ext_name(filename: str) -> str:
    return filename.split(".", 1)[0]


def read_pt_interp(path: str) -> str | None:
    """The program interpreter (PT_INTERP) of an ELF executable, or None (not ELF, static)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64 only
                return None
            order = "<" if head[5] == 1 else ">"
            phoff = int.from_bytes(head[0x20:0x28], "little" if order == "<" else "big")
            phentsize = int.from_bytes(head[0x36:0x38], "little" if order == "<" else "big")
            phnum = int.from_bytes(head[0x38:0x3A], "little" if order == "<" else "big")
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                bo = "little" if order == "<" else "big"
                if int.from_bytes(ph[0:4], bo) == 3:  # PT_INTERP
                    off, size = int.from_bytes(ph[8:16], bo), int.from_bytes(ph[32:40], bo)
                    f.seek(off)
                    return f.read(size).rstrip(b"\x00").decode()
    except (OSError, ValueError, IndexError):
        return None
    return None


def shared_libraries(interp: str, objects: list[str]) -> tuple[list[str], dict[str, str]]:
    """Paths of the shared libraries the loader maps for ``objects`` (``ld.so --list``, run in
    parallel with an empty environment), and ``{object: reason}`` for those it could not resolve."""
    procs = [(o, subprocess.Popen([interp, "--list", o], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={}, cwd="/")) for o in objects]
    libs: list[str] = []
    failed: dict[str, str] = {}
    for obj, p in procs:
        out = p.communicate()[0].decode("utf-8", "replace")
        for line in out.splitlines():
            line = line.strip()
            if "=> not found" in line:
                failed[obj] = line
            elif "=>" in line:
                path = line.split("=>", 1)[1].strip().rsplit(" (", 1)[0].strip()
                if path.startswith("/"):
                    libs.append(path)
            elif line.startswith("/"):
                libs.append(line.rsplit(" (", 1)[0].strip())
        if p.returncode not in (0, 1) and obj not in failed and "statically linked" not in out:
            failed[obj] = out.strip()[:200]
    return sorted(set(libs)), failed


class _Plan:
    """Ordered mount operations (see ``_sandbox_worker._build_root``)."""

    def __init__(self):
        self.ops: list[list] = []
        self.mounts: list[tuple[str, str]] = [("/", "tmpfs")]  # (path, "bind" | "tmpfs")
        self.made: set[str] = {"/"}

    def _innermost(self, path: str) -> str:
        best, kind = "", "tmpfs"
        for p, k in self.mounts:
            if (path == p or path.startswith(p.rstrip("/") + "/")) and len(p) >= len(best):
                best, kind = p, k
        return kind

    def _covered(self, path: str) -> bool:
        """Already visible through a bind mount of an ancestor (or itself)."""
        return self._innermost(path) == "bind"

    def _add(self, op: list) -> None:
        path = op[1]
        if path in self.made or self._covered(path):
            return
        self.made.add(path)
        self.ops.append(op)
        if op[0] in ("bind", "dev"):
            self.mounts.append((path, "bind"))
        elif op[0] == "hide" and op[2] == "dir":
            self.mounts.append((path, "tmpfs"))

    def expose(self, path: str) -> str:
        """Make ``path`` resolve in the root as on the host; returns its real path (bound)."""
        queue = [c for c in path.split("/") if c]
        cur, hops = "/", 0
        while queue:
            comp = queue.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                cur = os.path.dirname(cur) or "/"
                continue
            nxt = os.path.join(cur, comp)
            st = os.lstat(nxt)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    raise OSError(f"too many symlinks in {path}")
                target = os.readlink(nxt)
                self._add(["symlink", nxt, target])
                queue = [c for c in target.split("/") if c] + queue
                if target.startswith("/"):
                    cur = "/"
                continue
            if queue:
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(nxt)
                self._add(["dir", nxt])
            cur = nxt
        kind = "dir" if os.path.isdir(cur) else "file"
        self._add(["bind", cur, kind])
        return cur

    def hide(self, path: str) -> None:
        """Replace an existing directory by an empty tmpfs, or a file by an empty file."""
        self.made.discard(path)
        kind = "dir" if os.path.isdir(path) else "file"
        self.ops.append(["hide", path, kind])
        self.made.add(path)
        if kind == "dir":
            self.mounts.append((path, "tmpfs"))

    def device(self, path: str) -> None:
        for parent in _parents(path):
            self._add(["dir", parent])
        self._add(["dev", path])

    def mkdir(self, path: str) -> None:
        for parent in _parents(path) + [path]:
            self._add(["dir", parent])


def _parents(path: str) -> list[str]:
    out, cur = [], os.path.dirname(path)
    while cur not in ("/", ""):
        out.append(cur)
        cur = os.path.dirname(cur)
    return out[::-1]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=8)
def plan(executable: str, packages: tuple[str, ...]) -> dict:
    """The worker root for this interpreter and these importable packages.

    Returns:
        dict with ``ops`` (mount operations, in order; paths are paths in the root, binds and devices
        also carry the host path they show), ``exe`` (the interpreter's real path, the one the worker
        execs), ``sys_path`` (the server's import path inside the root), ``read_roots``
        (what programs may read besides their directory), ``hidden`` (extension module names made
        unloadable), ``errors`` (``{what: reason}`` for packages that could not be added), and
        ``host``: ``exe``, ``sys_path`` and ``read_roots`` as host paths (the weak mode's).
    """
    p = _Plan()
    errors: dict[str, str] = {}
    exe = os.path.realpath(executable)
    interp = read_pt_interp(exe)
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    dynload = os.path.realpath(sysconfig.get_path("platstdlib") or stdlib)
    dynload = os.path.join(dynload, "lib-dynload") if os.path.isdir(os.path.join(dynload, "lib-dynload")) else None
    if dynload is None:
        for entry in sys.path:
            if entry.endswith("lib-dynload") and os.path.isdir(entry):
                dynload = os.path.realpath(entry)
    exts = sorted(os.listdir(dynload)) if dynload else []
    hidden = [f for f in exts if _ext_name(f) in HIDDEN_EXTENSIONS]
    allowed_ext = [os.path.join(dynload, f) for f in exts if f.endswith(".so") and f not in hidden]

    # Packages: each top-level name is exposed where the trainer's interpreter finds it.
    pkg_paths, pkg_entries, pkg_objects = [], [], []
    real_sys_path = [os.path.realpath(e) for e in sys.path if e and os.path.isdir(e)]
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as e:
            errors[f"package {name}"] = str(e)
            continue
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            if spec is None:
                errors[f"package {name}"] = f"No module named {name!r}"
            continue
        locs = list(spec.submodule_search_locations or [])
        target = os.path.realpath(locs[0] if locs else spec.origin)
        if _inside(target, stdlib) and not _inside(target, os.path.join(stdlib, "site-packages")):
            continue  # part of the stdlib
        entry = next((e for e in real_sys_path if _inside(target, e) and target != e), os.path.dirname(target))
        pkg_paths.append(target)
        if entry not in pkg_entries:
            pkg_entries.append(entry)
        if os.path.isdir(target):
            for dirpath, _, files in os.walk(target):
                pkg_objects += [os.path.join(dirpath, f) for f in files if f.endswith(".so")]
        elif target.endswith(".so"):
            pkg_objects.append(target)

    libs, failed = shared_libraries(interp, [exe] + allowed_ext + pkg_objects) if interp else ([], {})
    for obj, why in failed.items():
        errors[f"libs {os.path.basename(obj)}"] = why

    # 1. the runtime: interpreter, loader, libraries, loader cache, stdlib (and its zip, if any)
    p.expose(exe)
    if interp:
        p.expose(interp)
    for lib in libs:
        p.expose(lib)
    if os.path.isfile("/etc/ld.so.cache"):
        p.expose("/etc/ld.so.cache")
    p.expose(stdlib)
    zips = [os.path.realpath(e) for e in sys.path if e.endswith(".zip") and os.path.isfile(e)]
    for z in zips:
        p.expose(z)
    if dynload and not _inside(dynload, stdlib):
        p.expose(dynload)
    # 2. what the stdlib tree holds beyond the stdlib
    for sub in ("site-packages", "dist-packages"):
        d = os.path.join(stdlib, sub)
        if os.path.isdir(d) and not os.path.islink(d):
            p.hide(d)
    for f in hidden:
        p.hide(os.path.join(dynload, f))
    # 3. the allowed packages, 4. devices and the programs' directory
    for target in pkg_paths:
        p.expose(target)
    for dev in DEVICES:
        if os.path.exists(dev):
            p.device(dev)

    sys_path = zips + [stdlib] + ([dynload] if dynload else []) + pkg_entries
    read_roots = [stdlib] + ([dynload] if dynload and not _inside(dynload, stdlib) else []) + zips + pkg_paths
    # Destinations: the host path, or its alias for what lives under the host's /tmp. Binds and
    # devices carry both: ["bind", host path, "dir" | "file", path in the root].
    ops: list[list] = []
    if any(_alias(op[1]) != op[1] for op in p.ops):
        ops.append(["dir", TMP_ALIAS])
    for op in p.ops:
        if op[0] in ("bind", "dev"):
            ops.append([op[0], op[1], op[2] if len(op) > 2 else "file", _alias(op[1])])
        elif op[0] == "symlink":
            ops.append(["symlink", _alias(op[1]), _alias(op[2]) if op[2].startswith("/") else op[2]])
        else:
            ops.append([op[0], _alias(op[1]), *op[2:]])
    ops.append(["dir", WORKDIR])  # the mount point of the programs' tmpfs
    return {"ops": ops, "exe": _alias(exe), "sys_path": [_alias(x) for x in sys_path],
            "read_roots": [_alias(x) for x in read_roots], "hidden": sorted({_ext_name(f) for f in hidden}),
            "errors": errors, "host": {"exe": exe, "sys_path": sys_path, "read_roots": read_roots}}
