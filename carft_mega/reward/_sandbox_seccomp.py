"""A seccomp-BPF syscall filter for the sandbox's programs (x86_64 and aarch64).

The filter is a deny list: the syscalls a math program never needs and that would let a program that
got past the audit hook reach beyond its process (sockets, tracing, other processes' memory, pidfds,
namespaces, mounts, keyrings, SysV IPC and POSIX message queues, exec, kernel modules, io_uring, bpf,
perf). Denied calls fail with EPERM. Everything else is allowed: a deny list keeps the Python runtime
working across glibc and kernel versions, and the namespaces, the minimal root and the unprivileged
uid remain the walls around it. The filter is installed by the worker before it execs the server, so
the server and every program (its forks) run under it; the server never installs anything itself
(installing needs ctypes, which must stay out of program space).

Special cases, from the kernel's documentation (Documentation/userspace-api/seccomp_filter.rst) and
from how container runtimes write theirs (the ENOSYS answer to clone3 is Docker's and systemd's idea):
  * another architecture in seccomp_data.arch (e.g. int 0x80 on x86_64): the process is killed;
  * x32 syscall numbers (bit 30 set on x86_64): EPERM;
  * clone(2) with any CLONE_NEW* flag: EPERM; plain fork/vfork/threads pass;
  * clone3(2): ENOSYS, since its flags sit in memory a filter cannot read; glibc then uses clone(2);
  * execve(2): EPERM; execveat(2) only with ``exec_fd`` as the directory fd, which is how the worker
    starts the server (``os.execve(fd, ...)`` is fexecve, i.e. execveat(fd, "", AT_EMPTY_PATH)).
    Programs run with RLIMIT_NOFILE far below ``exec_fd``, so they cannot hold that descriptor.

This module imports ctypes only in ``install``.
"""

from __future__ import annotations

import os
import struct

# Syscall numbers: x86_64 from <asm/unistd_64.h>, aarch64 from <asm-generic/unistd.h> (Linux 6.x).
# tests/reward/test_sandbox_seccomp.py checks them against the headers when those are installed.
_X86_64 = {
    "socket": 41, "socketpair": 53, "connect": 42, "bind": 49, "listen": 50, "accept": 43, "accept4": 288,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_open": 434,
    "pidfd_send_signal": 424, "pidfd_getfd": 438, "kcmp": 312, "unshare": 272, "setns": 308,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "mount_setattr": 442, "move_mount": 429,
    "open_tree": 428, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "keyctl": 250,
    "add_key": 248, "request_key": 249, "shmget": 29, "shmat": 30, "shmdt": 67, "shmctl": 31, "semget": 64,
    "semop": 65, "semctl": 66, "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
    "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
    "mq_getsetattr": 245, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167,
    "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "lookup_dcookie": 212, "fanotify_init": 300, "sethostname": 170,
    "setdomainname": 171, "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
    "vhangup": 153, "syslog": 103, "iopl": 172, "ioperm": 173, "modify_ldt": 154, "uselib": 134,
    "execve": 59, "execveat": 322, "clone": 56, "clone3": 435,
}
_AARCH64 = {
    "socket": 198, "socketpair": 199, "connect": 203, "bind": 200, "listen": 201, "accept": 202,
    "accept4": 242, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_open": 434,
    "pidfd_send_signal": 424, "pidfd_getfd": 438, "kcmp": 272, "unshare": 97, "setns": 268, "mount": 40,
    "umount2": 39, "pivot_root": 41, "chroot": 51, "mount_setattr": 442, "move_mount": 429, "open_tree": 428,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "keyctl": 219, "add_key": 217,
    "request_key": 218, "shmget": 194, "shmat": 196, "shmdt": 197, "shmctl": 195, "semget": 190, "semop": 193,
    "semctl": 191, "semtimedop": 192, "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187,
    "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183, "mq_notify": 184,
    "mq_getsetattr": 185, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 104, "kexec_file_load": 294,
    "init_module": 105, "finit_module": 273, "delete_module": 106, "reboot": 142, "swapon": 224,
    "swapoff": 225, "acct": 89, "quotactl": 60, "quotactl_fd": 443, "name_to_handle_at": 264,
    "open_by_handle_at": 265, "lookup_dcookie": 18, "fanotify_init": 262, "sethostname": 161,
    "setdomainname": 162, "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
    "vhangup": 58, "syslog": 116, "execve": 221, "execveat": 281, "clone": 220, "clone3": 435,
}
TABLES = {"x86_64": _X86_64, "aarch64": _AARCH64}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # <linux/audit.h>
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

# Denied outright (EPERM); clone, clone3, execve and execveat are handled separately.
DENIED = tuple(n for n in _X86_64 if n not in ("clone", "clone3", "execve", "execveat"))

CLONE_NS_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
EPERM, ENOSYS = 1, 38

# BPF opcodes (<linux/bpf_common.h>) and seccomp return values (<linux/seccomp.h>).
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (little endian).
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16


def machine() -> str | None:
    """The filter's name for this machine's architecture, or None when unsupported."""
    return _MACHINES.get(os.uname().machine.lower())


def _stmt(code: int, k: int) -> tuple:
    return (code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> tuple:
    return (code, jt, jf, k)


def build_filter(arch: str, exec_fd: int | None = None) -> list[tuple]:
    """The filter as a list of ``(code, jt, jf, k)`` BPF instructions.

    Args:
        arch: ``"x86_64"`` or ``"aarch64"``.
        exec_fd: the one directory fd for which execveat(2) is allowed (None: no exec at all).
    """
    nrs = TABLES[arch]
    deny = _RET_ERRNO | EPERM
    prog = [_stmt(_LD_W_ABS, _OFF_ARCH),
            _jump(_JEQ_K, _AUDIT_ARCH[arch], 1, 0),
            _stmt(_RET_K, _RET_KILL_PROCESS),
            _stmt(_LD_W_ABS, _OFF_NR)]
    if arch == "x86_64":  # the x32 ABI shares the arch value; its numbers have bit 30 set
        prog += [_jump(_JSET_K, 0x40000000, 0, 1), _stmt(_RET_K, deny)]
    for name in DENIED:
        if name in nrs:
            prog += [_jump(_JEQ_K, nrs[name], 0, 1), _stmt(_RET_K, deny)]
    prog += [_jump(_JEQ_K, nrs["execve"], 0, 1), _stmt(_RET_K, deny)]
    prog += [_jump(_JEQ_K, nrs["clone3"], 0, 1), _stmt(_RET_K, _RET_ERRNO | ENOSYS)]
    # clone: flags in args[0] (both architectures); the namespace flags live in its low word.
    prog += [_jump(_JEQ_K, nrs["clone"], 0, 4),
             _stmt(_LD_W_ABS, _OFF_ARG0_LO),
             _jump(_JSET_K, CLONE_NS_FLAGS, 0, 1),
             _stmt(_RET_K, deny),
             _stmt(_RET_K, _RET_ALLOW)]
    # execveat: only with exec_fd as its directory fd (int, so the low word decides).
    if exec_fd is None:
        prog += [_jump(_JEQ_K, nrs["execveat"], 0, 1), _stmt(_RET_K, deny)]
    else:
        prog += [_jump(_JEQ_K, nrs["execveat"], 0, 4),
                 _stmt(_LD_W_ABS, _OFF_ARG0_LO),
                 _jump(_JEQ_K, exec_fd & 0xFFFFFFFF, 1, 0),
                 _stmt(_RET_K, deny),
                 _stmt(_RET_K, _RET_ALLOW)]
    prog.append(_stmt(_RET_K, _RET_ALLOW))
    return prog


def pack(prog: list[tuple]) -> bytes:
    """``struct sock_filter[]`` bytes (u16 code, u8 jt, u8 jf, u32 k; native byte order)."""
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def install(exec_fd: int | None = None) -> None:
    """Set no_new_privs and install the filter on the calling thread (inherited by forks and kept
    across exec). Raises OSError when the kernel refuses, RuntimeError on an unsupported machine."""
    arch = machine()
    if arch is None:
        raise RuntimeError(f"no seccomp syscall table for {os.uname().machine}")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: also what lets a non-root process filter itself
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")
    code = pack(build_filter(arch, exec_fd))
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    if prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_SECCOMP: {os.strerror(err)}")
