"""Sandbox worker: builds one worker's isolation, then execs the server that runs the programs.

Started by ``carft_mega.reward.sandbox`` as ``python -I <this file>``; it imports nothing from
carft_mega but ``_sandbox_seccomp`` (stdlib and ctypes only). It reads one JSON config line (limits,
and the root plan of ``_sandbox_view.plan``) from stdin, then:

full mode (the default; refused start when the kernel does not allow it):
  1. when not root, a new user namespace first (CLONE_NEWUSER, identity map of the trainer's uid/gid,
     setgroups denied), then new mount, PID, network, IPC, UTS and cgroup namespaces; it then holds an
     O_PATH descriptor for everything the root will show (before the staging tmpfs hides any of it);
  2. builds the root on a fresh tmpfs (the plan's binds, symlinks, hidden files, devices), makes it
     all read-only and nosuid (mount_setattr, AT_RECURSIVE; or remounts), checks it, and pivot_roots
     into it, detaching the host's tree;
  3. forks the server's process, pid 1 of the new PID namespace, which dies with this one
     (PR_SET_PDEATHSIG), drops the capability bounding set (root: all but SETUID/SETGID/KILL, needed
     to run programs as ``nobody`` and kill them), installs the seccomp filter (``_sandbox_seccomp``)
     with no_new_privs, and execs a fresh interpreter on the server's source (so no ctypes, nothing of
     this process, is in its memory);
  4. stays behind as the mounter: for every program the server asks for (``m``), it unmounts the
     previous program's tmpfs (MNT_DETACH cannot fail) and mounts a fresh, empty one at /tmp, owned
     by the programs' uid. It exits when the server does; the server exits at EOF on its stdin, which
     is also what the trainer's death looks like.
weak mode (only if the user opted in, or namespaces were turned off): no namespaces and no new root;
  the seccomp filter and no_new_privs, then exec of the server in this same process.
A set-up error is reported as ``{"ready": false, "fatal": ...}`` on stdout.
"""

import json
import os
import resource
import select
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _sandbox_seccomp  # noqa: E402  (a sibling file; this script runs with -I)

_CLONE_NEWNS, _CLONE_NEWCGROUP, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 8, 32, 4096
_MS_REC, _MS_PRIVATE = 16384, 1 << 18
_MNT_DETACH = 2
_SYS = {"x86_64": {"pivot_root": 155, "mount_setattr": 442}, "aarch64": {"pivot_root": 41, "mount_setattr": 442}}
_CAP_KILL, _CAP_SETGID, _CAP_SETUID, _CAP_LAST = 5, 6, 7, 63
_STAGE = "/tmp"  # where the new root is assembled (hidden by it; the host's /tmp is untouched)
_MB = 1 << 20


class _Refused(Exception):
    """The kernel refused a namespace (the weak mode may take over, if the user opted in)."""


class _Libc:
    def __init__(self):
        import ctypes

        self.ct = ctypes
        self.c = ctypes.CDLL(None, use_errno=True)
        self.c.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self.c.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        self.c.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.c.unshare.argtypes = [ctypes.c_int]
        self.arch = _sandbox_seccomp.machine()

    def _check(self, ret, what):
        if ret != 0:
            err = self.ct.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def prctl(self, option, arg2=0):
        self._check(self.c.prctl(option, arg2, 0, 0, 0), f"prctl({option})")

    def unshare(self, flags):
        self._check(self.c.unshare(flags), "unshare")

    def mount(self, src, target, fstype, flags, data=None):
        enc = (lambda s: s.encode() if isinstance(s, str) else s)
        self._check(self.c.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    def umount2(self, target, flags):
        self._check(self.c.umount2(target.encode(), flags), f"umount {target}")

    def pivot_root(self, new, old):
        nr = _SYS.get(self.arch, {}).get("pivot_root")
        if nr is None:
            raise OSError(38, "pivot_root: unknown syscall number on this machine")
        ct = self.ct
        self._check(self.c.syscall(ct.c_long(nr), ct.c_char_p(new.encode()), ct.c_char_p(old.encode())),
                    "pivot_root")

    def read_only_tree(self, path):
        """RDONLY|NOSUID on ``path`` and every mount below it (mount_setattr, Linux 5.12). False when
        the syscall is missing (the caller then remounts one by one)."""
        nr = _SYS.get(self.arch, {}).get("mount_setattr")
        if nr is None:
            return False
        ct = self.ct
        attr = (ct.c_uint64 * 4)(0x1 | 0x2, 0, 0, 0)  # attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
        ret = self.c.syscall(ct.c_long(nr), ct.c_int(-100), ct.c_char_p(path.encode()), ct.c_uint(0x8000),
                             ct.byref(attr), ct.c_size_t(32))  # AT_FDCWD, AT_RECURSIVE
        if ret != 0:
            err = ct.get_errno()
            if err in (38, 1):  # ENOSYS, or EPERM from a filter that does not know it
                return False
            raise OSError(err, f"mount_setattr {path}: {os.strerror(err)}")
        return True


def _reply(obj):
    os.write(1, json.dumps(obj).encode() + b"\n")


def _userns_refusal(err):
    """Why the kernel refused an unprivileged user namespace, and what to do."""
    facts = []
    for path in ("/proc/sys/kernel/unprivileged_userns_clone", "/proc/sys/user/max_user_namespaces",
                 "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"):
        try:
            with open(path) as f:
                facts.append(f"{path[len('/proc/sys/'):].replace('/', '.')} = {f.read().strip()}")
        except OSError:
            pass
    return (f"unshare(CLONE_NEWUSER) failed with {os.strerror(err.errno) if err.errno else err}"
            f"{' (' + ', '.join(facts) + ')' if facts else ''}. Unprivileged user namespaces are off: "
            "ask the administrator to allow them (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces > 0, kernel.apparmor_restrict_unprivileged_userns=0, or a container "
            "seccomp profile that allows unshare), or run the trainer as root")


def _isolate(lib, uid, gid, layers):
    """New user (not root) and then mount/PID/network/IPC/UTS/cgroup namespaces."""
    if os.geteuid() != 0:
        try:
            lib.unshare(_CLONE_NEWUSER)
        except OSError as e:
            raise _Refused(_userns_refusal(e)) from None
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        layers["userns"] = True
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS | _CLONE_NEWCGROUP
    try:
        lib.unshare(flags)
    except OSError as e:
        raise _Refused(f"unshare(mount, PID, network, IPC, UTS, cgroup namespaces) failed: {e.strerror}"
                       + ("" if layers["userns"] else " (root without CAP_SYS_ADMIN, e.g. a container's "
                                                      "default seccomp profile or capability set?)")) from None
    layers.update(mountns=True, pidns=True, netns=True, ipcns=True, utsns=True, cgroupns=True)


def _hold(plan):
    """O_PATH descriptors of every bind source, opened before the namespaces (path -> fd)."""
    fds = {}
    for op in plan["ops"]:
        if op[0] in ("bind", "dev"):  # ["bind", host path, kind, path in the root]
            fds[op[1]] = os.open(op[1], os.O_PATH | os.O_CLOEXEC)
    return fds


def _build_root(lib, plan, fds, cfg_ro_method="auto"):
    """Assemble the plan on a tmpfs at _STAGE, make it read-only, pivot_root into it. Returns how it
    was made read-only (``mount_setattr`` or ``remount``)."""
    lib.mount("none", "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back to the host
    lib.mount("tmpfs", _STAGE, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,nr_inodes=16384,mode=0755")
    empty = _STAGE + "/.empty"
    os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o444))
    tmpfs_mounts = [_STAGE]
    for op in plan["ops"]:
        kind = op[0]
        path = _STAGE + (op[3] if kind in ("bind", "dev") else op[1])
        if kind == "dir":
            if not os.path.isdir(path):
                os.mkdir(path, 0o755)
        elif kind == "symlink":
            if not os.path.lexists(path):
                os.symlink(op[2], path)
        elif kind in ("bind", "dev"):
            is_dir = kind == "bind" and op[2] == "dir"
            if not os.path.lexists(path):
                if is_dir:
                    os.mkdir(path, 0o755)
                else:
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o444))
            # Recursive: the root shows the tree as the host does, mounts inside it included (and a
            # user namespace refuses a plain bind of a tree with locked mounts in it).
            lib.mount(f"/proc/self/fd/{fds[op[1]]}", path, None, _MS_BIND | _MS_REC)
        elif kind == "hide":
            if op[2] == "dir":
                lib.mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=64k,mode=0755")
                tmpfs_mounts.append(path)
            else:
                lib.mount(empty, path, None, _MS_BIND)
    os.unlink(empty)
    method = "mount_setattr" if cfg_ro_method != "remount" and lib.read_only_tree(_STAGE) else "remount"
    if method == "remount":
        # Linux < 5.12 (RHEL 8's 4.18, say): remount every mount of the new root, one by one, as a
        # read-only bind that keeps the flags a user namespace does not let it drop.
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4].encode().decode("unicode_escape") for ln in f]
        for mp in sorted({m for m in points if m == _STAGE or m.startswith(_STAGE + "/")}, key=len):
            lib.mount(None, mp, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _kept_flags(mp))
    _check_read_only(plan)
    os.chdir(_STAGE)
    lib.pivot_root(".", ".")  # the new root stacks over the old one (pivot_root(2), NOTES) ...
    lib.umount2(".", _MNT_DETACH)  # ... which is then detached, and the host's tree is gone
    os.chdir("/")
    return method


def _kept_flags(path):
    """nodev/noexec and the atime flags of the mount at ``path``: a remount in a user namespace must
    keep them (they are locked), and keeping them is right anyway. statvfs's ST_* equal the MS_*
    values but for ST_RELATIME (4096), which is MS_RELATIME (1 << 21)."""
    f = os.statvfs(path).f_flag
    return (f & (_MS_NODEV | _MS_NOEXEC | 1024 | 2048)) | ((1 << 21) if f & 4096 else 0)


def _check_read_only(plan):
    """Every directory of the new root refuses a new file (EROFS), or the worker does not start."""
    for op in plan["ops"]:
        if op[0] == "dir" or (op[0] == "bind" and op[2] == "dir"):
            path = _STAGE + (op[3] if op[0] == "bind" else op[1])
            try:
                fd = os.open(os.path.join(path, ".carft_rw_probe"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except OSError as e:
                if e.errno == 30:  # EROFS
                    continue
                raise OSError(e.errno, f"read-only check of {path}: {e.strerror}") from None
            os.close(fd)
            os.unlink(os.path.join(path, ".carft_rw_probe"))
            raise OSError(1, f"{path} is writable in the sandbox root")


def _place_fds(fds):
    """Make ``fds`` the inheritable descriptors 3, 4, ... (for the server), whatever their numbers."""
    copies = [os.dup(fd) for fd in fds]  # above every target, so that no dup2 clobbers a source
    for i, fd in enumerate(copies):
        os.dup2(fd, 3 + i, inheritable=True)
    for fd in set(copies + list(fds)) - set(range(3, 3 + len(fds))):
        os.close(fd)


def _drop_bounding_set(lib, keep):
    for cap in range(_CAP_LAST + 1):
        if cap in keep:
            continue
        try:
            lib.prctl(24, cap)  # PR_CAPBSET_DROP
        except OSError as e:
            if e.errno == 22:  # EINVAL: past the kernel's last capability
                break
            raise


def _exec_server(lib, exe, cfg, src):
    """Seccomp, then exec the server (a fresh interpreter on the server's source) in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024 and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    magic = min(1000, soft - 1)  # programs get RLIMIT_NOFILE 64: they can never hold it
    if magic < 64:
        raise OSError(24, f"RLIMIT_NOFILE {soft} leaves no descriptor above the programs' 64")
    exe_fd = os.open(exe, os.O_PATH | os.O_CLOEXEC)
    os.dup2(exe_fd, magic, inheritable=False)
    os.close(exe_fd)
    if cfg.get("seccomp", True):
        _sandbox_seccomp.install(exec_fd=magic)  # also sets no_new_privs
    else:
        lib.prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    argv = [exe, "-I", "-S", "-B", "-c", src]
    os.execve(magic, argv, {"LC_ALL": "C.UTF-8"})


def _nobody():
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


def main():
    cfg_line = sys.stdin.buffer.readline()
    msg = json.loads(cfg_line)
    cfg, plan, mode = msg["cfg"], msg["plan"], msg["namespaces"]
    layers = {"userns": False, "mountns": False, "pidns": False, "netns": False, "ipcns": False, "utsns": False,
              "cgroupns": False, "minimal_root": False, "read_only_root": False, "fresh_tmpfs": False,
              "seccomp": False, "no_new_privs": True, "die_with_trainer": True}
    errors = dict(plan.get("errors", {}))
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_server.py")) as f:
        src = f.read()  # now: the root built below does not have it
    lib = _Libc()
    # No PR_SET_PDEATHSIG here: it fires when the trainer *thread* that started this worker exits, and
    # a pool may be created from any thread. The trainer's death closes the server's stdin instead:
    # the server ends, and this process with it.
    root = os.geteuid() == 0
    uid, gid = _nobody() if root else (os.getuid(), os.getgid())
    seccomp_ok = cfg.get("seccomp", True) and lib.arch is not None
    if cfg.get("seccomp", True) and lib.arch is None:
        errors["seccomp"] = f"no syscall table for {os.uname().machine}"
    layers["seccomp"] = seccomp_ok
    common = {"cfg": cfg, "hidden": plan["hidden"], "host_modules": msg["host_modules"], "probe": msg["probe"],
              "drop": [uid, gid] if root else None}
    inside = {k: plan[k] for k in ("exe", "sys_path", "read_roots")}  # paths in the new root
    full = mode != "off"
    if full:
        try:
            _isolate(lib, uid, gid, layers)
            fds = _hold(plan)  # in the new mount namespace (a bind source must be in the caller's)
        except _Refused as e:
            if mode == "required":
                _reply({"ready": False, "fatal": str(e), "layers": layers, "errors": errors, "refused": True})
                return 1
            errors["namespaces"] = str(e)
            full = False
        except OSError as e:
            _reply({"ready": False, "fatal": f"sandbox set-up: {e}", "layers": layers, "errors": errors})
            return 1
    if not full:  # weak mode: seccomp, then the server in this process; programs see the host
        conf = os.memfd_create("carft_sandbox_config", os.MFD_CLOEXEC)  # any size, unlike a pipe
        os.write(conf, json.dumps({**common, **plan["host"], "full": False, "layers": layers, "errors": errors,
                                   "workdir": None}).encode() + b"\n")
        os.lseek(conf, 0, os.SEEK_SET)
        _place_fds([conf])
        _exec_server(lib, plan["host"]["exe"], cfg, src)
        return 1
    try:
        layers["read_only_by"] = _build_root(lib, plan, fds, cfg.get("read_only_method", "auto"))
    except OSError as e:
        _reply({"ready": False, "fatal": f"sandbox root: {e}", "layers": layers, "errors": errors})
        return 1
    for fd in fds.values():
        os.close(fd)
    layers.update(minimal_root=True, read_only_root=True, fresh_tmpfs=True)
    a2c_r, a2c_w = os.pipe()
    c2a_r, c2a_w = os.pipe()
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pid 1 of the new PID namespace: becomes the server
        try:
            os.close(alive_w)
            lib.prctl(1, 9)  # PR_SET_PDEATHSIG: die with the mounter (and so with the trainer)
            if select.select([alive_r], [], [], 0)[0]:  # EOF: the mounter died before the prctl
                os._exit(1)
            if root:
                _drop_bounding_set(lib, {_CAP_KILL, _CAP_SETGID, _CAP_SETUID})
            _place_fds([a2c_r, c2a_w])
            os.closerange(5, 1 << 16)
            _exec_server(lib, plan["exe"], cfg, src)
        except BaseException as e:
            try:
                _reply({"ready": False, "fatal": f"sandbox server start: {type(e).__name__}: {e}",
                        "layers": layers, "errors": errors})
            finally:
                os._exit(1)
    # The mounter. The server holds the trainer's pipes: EOF reaches the trainer when it exits.
    for fd in (a2c_r, c2a_w, alive_r):
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    os.write(a2c_w, json.dumps({**common, **inside, "full": True, "layers": layers, "errors": errors,
                                "workdir": "/tmp"}).encode() + b"\n")
    tmp_opts = (f"size={int(cfg['tmp_mb'])}m,nr_inodes={int(cfg['tmp_inodes'])},mode=0700,uid={uid},gid={gid}")
    mounted = False
    while True:
        try:
            req = os.read(c2a_r, 1)
        except OSError:
            break
        if not req:
            break
        try:
            if mounted:
                lib.umount2("/tmp", _MNT_DETACH)
                mounted = False
            lib.mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, tmp_opts)
            mounted = True
            os.write(a2c_w, b"k")
        except OSError as e:
            os.write(a2c_w, b"e" + str(e).encode("utf-8", "replace").replace(b"\n", b" ") + b"\n")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
