"""Hostile programs, one test per escape class of issue 10: each attack scores None and achieves
nothing, with the audit hook on and, where the OS must hold on its own, with the hook turned off
(``audit_hook=False``: what a program that blinded the hook could do). Sentinels with a known secret
lie outside the sandbox root (in the test's tmp_path, in a world-readable directory, in the trainer's
gold data); an attack succeeds if any of it comes back.

These run as root (CI) and as any other user (then the workers use user namespaces); the unprivileged
path is also exercised from root in test_sandbox_nonroot.py.
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from carft_mega.reward import Sandbox
from carft_mega.reward import _sandbox_view
from carft_mega.reward.sandbox import DEFAULT_LAZY_PRELOAD, DEFAULT_PRELOAD

SECRET = "carft-sentinel-" + uuid.uuid4().hex
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("CARFT_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
GOLD = os.path.join(DATA, "svamp", "svamp_python_sdp.json")
# None of these tests is about timeouts (test_sandbox.py is): a generous one keeps them right on a busy box.
PATIENT = 30.0


def prog(body, imports=""):
    lines = body.strip("\n").split("\n")
    return imports + "def solution():\n" + "\n".join("    " + ln for ln in lines) + "\n"


@pytest.fixture(scope="module")
def hooked():
    with Sandbox(workers=1, timeout=PATIENT) as pool:
        yield pool


@pytest.fixture(scope="module")
def blind():
    """A pool whose programs run without the audit hook: only the OS stands."""
    with Sandbox(workers=1, timeout=PATIENT, audit_hook=False) as pool:
        yield pool


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory):
    """Files holding SECRET: in pytest's tmp dir (root-only ancestors when root), in a world-readable
    directory (anyone on the host may read it), and a root-only 0600 file."""
    tmp = tmp_path_factory.mktemp("sentinel")
    private = tmp / "private.txt"
    private.write_text(SECRET)
    secret600 = tmp / "secret600.txt"
    secret600.write_text(SECRET)
    secret600.chmod(0o600)
    public_dir = tempfile.mkdtemp(prefix="carft_public_", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.chmod(public_dir, 0o755)
    public = os.path.join(public_dir, "public.txt")
    with open(public, "w") as f:
        f.write(SECRET)
    os.chmod(public, 0o644)
    paths = {"private": str(private), "secret600": str(secret600), "public": public}
    if os.path.exists(GOLD):
        paths["gold"] = os.path.abspath(GOLD)
    yield paths
    shutil.rmtree(public_dir, ignore_errors=True)


def _readers(paths):
    """Programs that try every way of getting a path's content; each returns 1.0 only on success."""
    out = []
    for p in paths:
        out.append(prog(f"return float('{SECRET}' in open({p!r}).read() or 'answer' in open({p!r}).read())"))
        out.append(prog(f"fd = os.open({p!r}, os.O_RDONLY)\nreturn float(len(os.read(fd, 100)) > 0)", "import os\n"))
        out.append(prog(f"return float(len(io.FileIO({p!r}).read()) > 0)", "import io\n"))
    return out


# ------------------------------------------------------------------ 1. the hook can be blinded

_SCAN = r"""
import gc, sys
def solution():
    gc.unfreeze()
    found = []
    bad_names = {"fork", "forkpty", "execv", "execve", "posix_spawn", "posix_spawnp", "system", "kill",
                 "killpg", "fork_exec", "pidfd_open", "pidfd_send_signal", "pthread_kill", "prctl",
                 "capset", "clear_caps", "setns", "unshare", "popen", "spawnv"}
    for o in gc.get_objects():
        t = type(o)
        mod = getattr(t, "__module__", "") or ""
        if mod == "_ctypes" or t.__name__ in ("CDLL", "CFuncPtr", "PyCFuncPtrType"):
            found.append("ctypes object " + t.__name__)
        if t.__name__ in ("builtin_function_or_method", "function") and getattr(o, "__name__", "") in bad_names:
            found.append(f"callable {getattr(o, '__module__', '?')}.{o.__name__}")
    todo, seen = list(object.__subclasses__()), set()
    while todo:
        c = todo.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        if c.__module__ in ("_ctypes", "_socket", "_posixsubprocess", "mmap"):
            found.append("type " + c.__module__ + "." + c.__name__)
        try:
            todo.extend(c.__subclasses__())
        except TypeError:
            todo.extend(type.__subclasses__(c))
    for name in ("_ctypes", "_posixsubprocess", "_socket", "mmap", "_multiprocessing", "fcntl", "__main__"):
        if name in sys.modules:
            found.append("module " + name)
    f = sys._getframe(1)
    while f is not None:  # the server's frames below the program: nothing left in its state
        st = f.f_locals.get("state")
        if st:
            found.append("server state in " + f.f_code.co_name)
        for name, v in f.f_globals.items():  # its globals: no module with process or signal functions
            if type(v) is type(sys) and any(hasattr(v, n) for n in bad_names):
                found.append(f"module {v.__name__} in server globals")
        f = f.f_back
    import os
    for fd in range(4, 1024):  # only stdin/out/err (/dev/null) and the result pipe are open
        try:
            os.fstat(fd)
            found.append(f"fd {fd}")
        except OSError:
            pass
    raise RuntimeError(repr(found))
"""


@pytest.mark.parametrize("pool", ["hooked", "blind"])
def test_nothing_in_program_space_reaches_ctypes_or_the_server(pool, request):
    """Issue 10, class 1: ctypes was reachable through object.__subclasses__() and through the
    worker's closures (prctl, the caps helper), and raw memory access blinded the hook. The server
    now never has ctypes (nor a process or socket module) in memory, and the program's copy of its
    state is emptied: no ctypes type or object, no process/signal function anywhere in the heap or
    in the server's globals, no descriptor of the server's."""
    pool = request.getfixturevalue(pool)
    res = pool.run_programs_detailed([_SCAN])[0]
    if pool.layers["audit_hook"]:  # gc.get_objects is denied outright
        assert res.value is None and "gc.get_objects is not allowed" in res.detail, res
    else:
        assert res.value is None and res.detail == "RuntimeError: []", res.detail
    assert pool.layers["server_has_ctypes"] is False


@pytest.mark.parametrize("pool", ["hooked", "blind"])
def test_blinded_hook_cannot_read_host_files(pool, request, sentinels):
    """Class 1's consequence: a program past the hook read any world-readable host file, the gold
    answers included. The root holds none of them."""
    pool = request.getfixturevalue(pool)
    paths = list(sentinels.values()) + ["/etc/passwd", "/etc/hostname", "/proc/self/environ",
                                        os.path.join(REPO, "README.md")]
    res = pool.run_programs_detailed(_readers(paths))
    assert [r.value for r in res] == [None] * len(res), [(r.status, r.detail) for r in res if r.value is not None]
    if not pool.layers["audit_hook"]:
        assert all("No such file or directory" in r.detail for r in res), [r.detail for r in res]


# ------------------------------------------------------------------ 2. the filesystem view is the host's

_WALK = r"""
import os
def solution():
    skip = tuple(ROOTS)
    files, dirs = [], []
    for d, ds, fs in os.walk("/"):
        if d.startswith(skip):
            ds[:] = []
            continue
        dirs.append(d)
        files += [os.path.join(d, f) for f in fs]
    unexpected = [f for f in files if f not in EXPOSED]
    unexpected += [d for d in dirs if d in FORBIDDEN]
    unexpected += [f for f in files + dirs if f.startswith("/tmp/")]
    if unexpected or not {"/dev/null", "/dev/urandom"} <= set(files) or "/tmp" not in dirs:
        raise RuntimeError(repr(unexpected[:8]))
    return float(len(files))
"""


def test_root_holds_only_the_runtime(blind):
    """Class 2: apart from /tmp, /var/tmp, /dev/shm, /run/lock and /proc the workers saw the whole
    host read-only. Walking the new root with the hook off finds only what the plan exposes: the
    interpreter, its loader and libraries, ld.so.cache, the stdlib and allowed packages, three
    devices, and the program's own (empty) /tmp."""
    plan = blind._message["plan"]
    exposed = sorted({op[3] if op[0] in ("bind", "dev") else op[1] for op in plan["ops"]
                      if op[0] in ("bind", "dev", "symlink")})
    forbidden = ["/proc", "/sys", "/home", "/run", "/var", "/mnt", "/opt", "/srv", "/boot", "/etc/ssl"]
    code = _WALK.replace("ROOTS", repr(plan["read_roots"])).replace("EXPOSED", repr(set(exposed)))
    res = blind.run_programs_detailed([code.replace("FORBIDDEN", repr(set(forbidden)))])[0]
    assert res.status == "ok" and res.value >= 5, res
    # and the check can fail: the same walk on the host finds plenty that the plan does not expose
    g = {}
    exec(code.replace("FORBIDDEN", repr(set(forbidden))), g)
    with pytest.raises(RuntimeError):
        g["solution"]()


@pytest.mark.parametrize("method", ["auto", "remount"])
def test_root_is_read_only(method, monkeypatch):
    """Every mount of the root refuses writes, made so by mount_setattr(AT_RECURSIVE) or, as on
    Linux < 5.12, by remounting each mount; the worker also checks it before it starts."""
    from carft_mega.reward import sandbox as sandbox_mod

    monkeypatch.setattr(sandbox_mod, "_READ_ONLY_METHOD", method)
    plan = _sandbox_view.plan(sys.executable, _sandbox_view.DEFAULT_PACKAGES)
    dirs = [op[3] for op in plan["ops"] if op[0] == "bind" and op[2] == "dir"] + ["/", "/dev", "/etc", "/usr"]
    files = [op[3] for op in plan["ops"] if op[0] == "bind" and op[2] == "file"][:5] + ["/dev/null"]
    programs = [prog(f"open({os.path.join(d, 'x')!r}, 'w')\nreturn 1") for d in dirs]
    programs += [prog(f"open({f!r}, 'r+b').write(b'x')\nreturn 1") for f in files if f != "/dev/null"]
    programs += [prog("open('/dev/null', 'w').write('x')\nopen('/tmp/ok', 'w').write('1')\n"
                      "return float(open('/tmp/ok').read())")]
    with Sandbox(workers=1, timeout=PATIENT, audit_hook=False) as pool:
        assert pool.layers["read_only_by"] == ("remount" if method == "remount" else "mount_setattr")
        res = pool.run_programs_detailed(programs)
    assert [r.value for r in res] == [None] * (len(programs) - 1) + [1.0], res
    assert all("Read-only file system" in r.detail or "Permission denied" in r.detail for r in res[:-1]), \
        [r.detail for r in res if "Read-only" not in r.detail]


def test_filesystem_sockets_and_metadata_are_out_of_reach(blind, sentinels, tmp_path):
    """Class 2: a program connected to an AF_UNIX listener on the host (outside the network
    namespace), and os.stat/os.access showed root-only files. Now: no socket module can load, the
    listener's path does not exist in the root, an abstract-namespace listener (the trainer's
    network namespace) is not reachable, and stat/access find nothing."""
    path = str(tmp_path / "listener.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(4)
    listener.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = "\0carft-" + uuid.uuid4().hex
    abstract.bind(abstract_name)
    abstract.listen(4)
    abstract.setblocking(False)
    try:
        programs = [
            prog(f"s = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\nreturn 1", "import socket\n"),
            prog(f"s = _socket.socket(1, 1)\ns.connect({path!r})\nreturn 1", "import _socket\n"),
            prog(f"s = _socket.socket(1, 1)\ns.connect({abstract_name!r})\nreturn 1", "import _socket\n"),
            prog(f"return float(os.path.exists({path!r}))", "import os\n"),
        ]
        for p in sentinels.values():
            programs.append(prog(f"return float(os.stat({p!r}).st_size)", "import os\n"))
            programs.append(prog(f"return float(os.access({p!r}, os.F_OK) or os.access({p!r}, os.R_OK))",
                                 "import os\n"))
        res = blind.run_programs_detailed(programs)
        values = [r.value for r in res]
        assert values[:3] == [None] * 3 and values[3] == 0.0, res[:4]
        assert values[4::2] == [None] * len(sentinels) and values[5::2] == [0.0] * len(sentinels), res[4:]
        for conn in (listener, abstract):
            with pytest.raises(BlockingIOError):
                conn.accept()  # nobody connected
    finally:
        listener.close()
        abstract.close()


# ------------------------------------------------------------------ 3. unaudited routes

@pytest.mark.parametrize("pool", ["hooked", "blind"])
def test_import_deny_list_cannot_be_bypassed(pool, request):
    """Class 3: importlib.import_module and _frozen_importlib._gcd_import went around the import
    deny list. Denied extension modules are empty files in the root and the server never loaded
    them, so no route gets a working socket, ctypes, mmap or process module."""
    pool = request.getfixturevalue(pool)
    routes = [
        "import importlib\nm = importlib.import_module('{m}')",
        "m = sys.modules['importlib'].import_module('{m}')",
        "m = sys.modules['_frozen_importlib']._gcd_import('{m}')",
        "m = __import__('{m}')",
        "m = sys.modules['_frozen_importlib_external'].ExtensionFileLoader('{m}', [p for p in sys.path "
        "if p.endswith('lib-dynload')][0] + '/{m}' + __import__('_imp').extension_suffixes()[0]).load_module()",
    ]
    mods = ["_socket", "_ctypes", "mmap", "_posixsubprocess", "_multiprocessing", "fcntl"]
    programs = [prog(r.format(m=m) + "\nreturn 1", "import sys\n") for m in mods for r in routes]
    res = pool.run_programs_detailed(programs)
    assert [r.value for r in res] == [None] * len(programs), [(p, r) for p, r in zip(programs, res) if r.value]
    assert all(r.status == "error" for r in res), [r for r in res if r.status != "error"]


@pytest.mark.parametrize("pool", ["hooked", "blind"])
def test_process_spawning_is_unreachable(pool, request, tmp_path):
    """Class 3: sympy's ``preview.check_output.__globals__['_fork_exec']`` started a process (as root,
    where RLIMIT_NPROC does not apply). sympy now gets a stand-in subprocess module, the server never
    loads _posixsubprocess, os has no fork/exec/spawn, there is no fresh posix, and exec is refused
    by seccomp; a marker command never runs."""
    pool = request.getfixturevalue(pool)
    marker = f"/tmp/carft_spawned_{uuid.uuid4().hex}"  # (a spawn would be in the program's own /tmp: the
    # values are the check; the marker also covers the weak mode's host /tmp)
    touch = f"['/usr/bin/touch', {marker!r}]"
    programs = [
        prog(f"from sympy.printing import preview\ng = preview.check_output.__globals__\n"
             f"g['_fork_exec']({touch}, [b'/usr/bin/touch'], True, (), None, None, -1, -1, -1, -1, -1, -1, "
             f"-1, -1, False, False, None, None, None, -1, None, False)\nreturn 1", "import sympy\n"),
        prog(f"from sympy.printing import preview\npreview.check_output({touch})\nreturn 1", "import sympy\n"),
        prog(f"import subprocess\nsubprocess.run({touch})\nreturn 1"),
        prog(f"os.execv('/usr/bin/touch', {touch})", "import os\n"),
        prog(f"os.posix_spawn('/usr/bin/touch', {touch}, {{}})\nreturn 1", "import os\n"),
        prog(f"os.system('touch {marker}')\nreturn 1", "import os\n"),
        prog("import _imp, sys\nfib = sys.modules['_frozen_importlib']\n"
             "p = _imp.create_builtin(fib.spec_from_loader('posix', fib.BuiltinImporter))\n"
             f"p.execv('/usr/bin/touch', {touch})"),
        prog("import _imp, sys\nfib = sys.modules['_frozen_importlib_external']\n"
             "spec = sys.modules['_frozen_importlib'].spec_from_loader('posix', None, origin='posix')\n"
             f"p = _imp.create_dynamic(spec)\np.execv('/usr/bin/touch', {touch})"),
    ]
    res = pool.run_programs_detailed(programs)
    assert [r.value for r in res] == [None] * len(programs), res
    time.sleep(0.1)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("pool", ["hooked", "blind"])
def test_ctypes_foreign_calls_are_unreachable(pool, request):
    """Class 3: plain ctypes calls raise no audit event in 3.11, so denying ctypes.call_function did
    nothing. ctypes cannot load at all (its _ctypes is an empty file; sympy's use is a stand-in)."""
    pool = request.getfixturevalue(pool)
    programs = [prog("import ctypes\nreturn float(ctypes.CDLL(None).getpid())"),
                prog("import sys\nreturn float(sys.modules['ctypes'].CDLL(None).getpid())"),
                prog("from sympy.external import gmpy\nimport sys\nc = sys.modules.get('ctypes') or "
                     "gmpy.sizeof.__globals__\nreturn float(c['CDLL'](None).getpid())", "import sympy\n")]
    res = pool.run_programs_detailed(programs)
    assert [r.value for r in res] == [None] * 3, res


def test_crafted_bytecode_cannot_be_loaded(hooked, blind):
    """Class 3: marshal.loads + exec ran crafted bytecode past the code/function constructors.
    marshal.loads is allowed only for the import system's own .pyc reads from the read-only
    runtime: not directly, not through importlib's helpers, not from a .pyc the program wrote,
    not through _imp.get_frozen_object's data argument. Imports that use the bytecode cache still
    work. Without the hook every route works (so the test can fail): there the OS layers stand."""
    payload = "import marshal\ndata = marshal.dumps(compile('X = 6 * 7', 'p', 'exec'))\n"
    programs = [
        prog(payload + "g = {}\nexec(marshal.loads(data), g)\nreturn g['X']"),
        prog(payload + "ext = __import__('sys').modules['_frozen_importlib_external']\n"
             "g = {}\nexec(ext._compile_bytecode(data), g)\nreturn g['X']"),
        prog(payload + "import _imp\ng = {}\nexec(_imp.get_frozen_object('__hello__', data), g)\nreturn g['X']"),
        # a .pyc of its own in its /tmp (X = 42; the source says X = 1), through the genuine loader
        prog(payload + "import sys\nopen('/tmp/evil.py', 'w').write('X = 1')\n"
             "ext = sys.modules['_frozen_importlib_external']\n"
             "open('/tmp/evil.pyc', 'wb').write(ext.MAGIC_NUMBER + b'\\0' * 12 + data)\n"
             "ext.cache_from_source = lambda p, *a, **k: '/tmp/evil.pyc'\n"
             "ext._validate_timestamp_pyc = lambda *a, **k: None\n"
             "sys.path.insert(0, '/tmp')\nimport evil\nreturn evil.X"),
        # the same, with the loader's I/O patched so that the genuine loader reads the program's bytes
        prog(payload + "import sys, io\nopen('/tmp/evil2.py', 'w').write('X = 1')\n"
             "ext = sys.modules['_frozen_importlib_external']\nraw = ext.MAGIC_NUMBER + b'\\0' * 12 + data\n"
             "real_cache, real_open = ext.cache_from_source, ext._io.open_code\n"
             "ext.cache_from_source = lambda p, *a, **k: real_cache(sys.modules['os'].__file__)\n"
             "ext._validate_timestamp_pyc = lambda *a, **k: None\nfake = type(sys)('fake_io')\n"
             "fake.open_code = lambda p: io.BytesIO(raw) if p.endswith('.pyc') else real_open(p)\n"
             "fake.FileIO = ext._io.FileIO\next._io = fake\n"
             "sys.path.insert(0, '/tmp')\nimport evil2\nreturn evil2.X"),
        prog("import textwrap, csv, array\nreturn float(len(textwrap.wrap('a b c', 1)))"),
    ]
    res = hooked.run_programs_detailed(programs)
    assert [r.value for r in res] == [None] * 5 + [3.0], res
    details = [r.detail for r in res[:5]]
    assert all("marshal.loads is not allowed" in d for d in details[:2] + details[3:]), details
    assert "is invalid" in details[2], details  # get_frozen_object turns the hook's refusal into this
    assert blind.run_programs(programs) == [42.0] * 5 + [3.0]


# ------------------------------------------------------------------ 4. lexical path checks

@pytest.mark.parametrize("pool", ["hooked", "blind"])
def test_dotdot_and_symlinks_do_not_reach_host_files(pool, request, sentinels):
    """Class 4: '/usr/lib/ssl/certs/../../../<path>' passed the hook's lexical read-root check while
    the kernel followed the symlink elsewhere. The hook refuses '..', and the kernel has nothing
    elsewhere to follow to: the root has no /usr/lib/ssl, no host file at all."""
    pool = request.getfixturevalue(pool)
    programs = []
    for p in sentinels.values():
        for via in ("/usr/lib/ssl/certs/../../../..", "/usr/lib/x86_64-linux-gnu/../../..",
                    sys.prefix + "/lib/../../../../../../..", "/tmp/../../.."):
            programs.append(prog(f"return float('{SECRET}' in open({via + p!r}).read() or 'answer' in "
                                 f"open({via + p!r}).read())"))
        programs.append(prog(f"os.symlink('/', '/tmp/up')\nreturn float(len(open('/tmp/up' + {p!r}).read()) > 0)",
                             "import os\n"))
    res = pool.run_programs_detailed(programs)
    assert [r.value for r in res] == [None] * len(programs), [r for r in res if r.value is not None]


# ------------------------------------------------------------------ 5. state that outlives a program

def _server_pid(worker_pid):
    with open(f"/proc/{worker_pid}/task/{worker_pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    assert len(kids) == 1, kids
    return kids[0]


def test_sysv_ipc_is_private_and_filtered(hooked):
    """Class 5: SysV shm segments, queues and semaphores lived in the host's IPC namespace and
    outlived the program, the worker and the pool. Each worker now has its own IPC (and POSIX
    mqueue) namespace, gone with it, and its seccomp filter refuses every SysV/mqueue call, so no
    program creates one at all (tests/reward/test_sandbox_seccomp.py checks the filter itself)."""
    server = _server_pid(hooked.worker_pids[0])
    for ns in ("ipc", "net", "mnt", "pid", "uts"):
        assert os.readlink(f"/proc/{server}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    with open(f"/proc/{server}/status") as f:
        assert "Seccomp:\t2" in f.read()
    programs = [prog("import _posixshmem\nreturn 1"),
                prog("from multiprocessing import shared_memory\nshared_memory.SharedMemory(create=True, size=8)\n"
                     "return 1"),
                prog("return float(os.path.exists('/dev/shm') or os.path.exists('/dev/mqueue'))", "import os\n")]
    assert hooked.run_programs(programs) == [None, None, 0.0]


def degrade_programs():
    """(nest, writer, precreate): 1100 nested directories and a full /tmp; a program that checks its
    directory is empty and writes a file; one that tries to pre-create the next program's directory
    (every name the old worker used) and chmods its own to 0. Also run in the weak mode by
    test_sandbox_nonroot.py."""
    nest = prog("import os\np = '.'\nfor i in range(1100):\n    p = p + '/d'\n"
                "    os.mkdir(p)\nopen(p + '/f', 'w').write('x' * 1000)\nn = 0\n"
                "try:\n    while n < 40:  # fills the 32 MiB tmpfs; bounded for the weak mode's host /tmp\n"
                "        open(f'fill{n}', 'w').write('y' * 1000000)\n        n += 1\n"
                "except OSError:\n    pass\nreturn float(n)")
    precreate = prog("import os\nhere = os.getcwd()\nup = os.path.dirname(here)\nmade = 0\nfor i in range(200):\n"
                     "    for name in (f'p{i}', str(i)):\n        try:\n"
                     "            os.mkdir(os.path.join(up, name))\n            made += 1\n"
                     "        except OSError:\n            pass\n"
                     "try:\n    os.chmod(here, 0)\nexcept OSError:\n    pass\nreturn float(made)")
    writer = prog("import os\nassert os.listdir('.') == [], os.listdir('.')\nopen('out.txt', 'w').write('7')\n"
                  "return float(open('out.txt').read())")
    return nest, writer, precreate


def test_a_program_cannot_degrade_the_next():
    """Class 5: 1100 nested directories plus a full /tmp made the worker's rmtree fail
    (RecursionError), and every later file-writing program scored None; with drop_privileges=False a
    program pre-created the next work directories. Now each program gets a fresh tmpfs (an unmount
    cannot fail). One worker, so every program lands where the last one was."""
    nest, writer, precreate = degrade_programs()
    with Sandbox(workers=1, timeout=PATIENT, audit_hook=False, tmp_mb=32) as pool:
        pid = pool.worker_pids
        res = pool.run_programs_detailed([nest, writer, precreate, writer, writer])
        assert res[0].status == "ok" and 1 <= res[0].value < 40, res[0]  # the tmpfs filled up
        assert [res[i].value for i in (1, 3, 4)] == [7.0, 7.0, 7.0], res
        assert res[2].status == "ok" and res[2].value == 0.0, res[2]  # / is read-only
        assert pool.worker_pids == pid and pool.replaced == 0
        assert pool.stats()["sandbox_errors"] == 0


def test_weak_mode_cleanup_cannot_fail(tmp_path):
    """The weak mode's (and a killed weak worker's) clean-up: a tree deeper than any recursion limit
    and longer than PATH_MAX, with directories chmod 0 and a symlink out, goes without recursion and
    without following the link (shutil.rmtree raised RecursionError on such a tree)."""
    from carft_mega.reward._sandbox_server import _remove_tree

    top = tmp_path / "work"
    top.mkdir()
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    fd = os.open(top, os.O_RDONLY)
    try:
        for i in range(3000):  # 3000 levels: deeper than sys.getrecursionlimit(), path > PATH_MAX
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            if i % 500 == 0:
                with open(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=nfd), "w") as f:
                    f.write("x")
                os.symlink(str(outside), "link", dir_fd=nfd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    (top / "d").chmod(0)
    with pytest.raises((RecursionError, OSError)):  # root: RecursionError; others: the chmod 0
        shutil.rmtree(top)
    assert _remove_tree(str(top)) is None
    assert not top.exists() and outside.read_text() == "keep"


# ------------------------------------------------------------------ 6. signals in root mode

def test_server_has_no_signal_handlers_and_programs_no_signal_functions(blind):
    """Class 6: pidfd_send_signal(SIGINT) to pid 1 killed the worker (Python's SIGINT handler). The
    server, pid 1 of its namespace, now catches no signal at all (the kernel then drops every signal
    sent to it from inside the namespace, SIGKILL included), pidfd_* are filtered, and programs have
    no kill/pidfd/pthread_kill function left to call."""
    server = _server_pid(blind.worker_pids[0])
    with open(f"/proc/{server}/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    assert int(status["SigCgt"], 16) == 0, status["SigCgt"]
    programs = [prog(f"return float(hasattr(os, {n!r}) or hasattr(sys.modules['posix'], {n!r}))", "import os, sys\n")
                for n in ("kill", "killpg", "pidfd_open", "setpgid", "setsid", "fork")]
    programs += [prog("import signal\nsignal.pidfd_send_signal\nreturn 1"),
                 prog("import _signal\nreturn float(hasattr(_signal, 'pidfd_send_signal'))"),
                 prog("import os\nos.kill(1, 2)\nreturn 1")]
    pids = blind.worker_pids
    res = blind.run_programs_detailed(programs)
    assert [r.value for r in res] == [0.0] * 6 + [None, None, None], res
    assert blind.worker_pids == pids and blind.run_programs([prog("return 5")]) == [5.0]


# ------------------------------------------------------------------ 7. programs that silently score None

def test_stdlib_imports_as_nobody_behind_a_0700_directory(tmp_path):
    """Class 7: an interpreter under a 0700 directory (pyenv/conda/uv under /root) was unreadable
    for the dropped-privilege programs: textwrap, csv, array failed and scored None. Reproduced on
    any machine by running the trainer on this interpreter bound (in a private mount namespace) under
    a 0700 directory of tmp_path; the root's directories on the way are new and 0755."""
    if os.geteuid() != 0:
        pytest.skip("binding an interpreter under a 0700 directory needs root (CI runs as root)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    prefix = locked / "python"
    import site

    script = (
        "import sys, json\n"
        f"sys.path[:0] = {[REPO] + site.getsitepackages()!r}\n"
        "from carft_mega.reward.sandbox import Sandbox\n"
        "with Sandbox(workers=1, timeout=30, packages=(), lazy_preload=()) as sb:\n"
        "    progs = ['import textwrap\\ndef solution():\\n    return len(textwrap.wrap(\"a b c\", 1))\\n',\n"
        "             'import csv, io\\ndef solution():\\n'\n"
        "             '    return len(list(csv.reader(io.StringIO(\"1,2\\\\n3,4\"))))\\n',\n"
        "             'import array\\ndef solution():\\n    return sum(array.array(\"i\", [1, 2, 3]))\\n',\n"
        "             'import os\\ndef solution():\\n    return os.getuid()\\n']\n"
        "    print(json.dumps({'exe': sys.executable, 'values': sb.run_programs(progs), 'layers': sb.layers}))\n")
    base = os.path.realpath(sys.base_prefix)
    rel_exe = os.path.relpath(os.path.realpath(sys.executable) if not hasattr(sys, "_base_executable")
                              else os.path.realpath(sys._base_executable), base)
    inner = os.path.join(str(prefix), rel_exe)
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f'mkdir -p "{prefix}" && mount --bind "{base}" "{prefix}" && exec "{inner}" -I -c "$0"', script]
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["exe"].startswith(str(locked)), out["exe"]
    assert out["values"] == [3.0, 2.0, 6.0, float(out["layers"]["uid"])] and out["layers"]["uid"] != 0, out


def test_misconfigured_sandbox_is_reported_not_scored(hooked):
    """Class 7: a program that fails because of the sandbox is a sandbox error, counted in stats()
    (the trainer logs it per step), never a silent wrong answer. Here: an installed module that the
    root does not serve."""
    hooked.stats(reset=True)
    res = hooked.run_programs_detailed([prog("import numpy\nreturn 1"), prog("import no_such_module_xyz\nreturn 1"),
                                        prog("return 1")])
    assert [r.status for r in res] == ["sandbox_error", "error", "ok"], res
    assert "numpy" in res[0].detail
    st = hooked.stats()
    assert st["sandbox_errors"] == 1 and st["ok"] == 1 and st["error"] == 1
    assert "numpy" in st["sandbox_error_details"][0]
    assert hooked.stats()["sandbox_errors"] == 0  # reset


def test_unreadable_stdlib_refuses_to_start(tmp_path):
    """A root in which programs cannot import the stdlib makes the pool refuse to start with the
    reason (the start-up probe imports textwrap, csv, array, ... as the programs' uid), instead of
    scoring every program None. Reproduced by binding a root-only copy over textwrap.py in a private
    mount namespace of the trainer."""
    if os.geteuid() != 0:
        pytest.skip("a root-only file that the trainer can read but programs cannot needs a root trainer")
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    import textwrap

    copy = tmp_path / "textwrap.py"
    shutil.copy(textwrap.__file__, copy)
    copy.chmod(0o600)
    target = os.path.realpath(textwrap.__file__)
    script = (
        "import sys\n"
        "from carft_mega.reward.sandbox import Sandbox, SandboxUnavailableError\n"
        "try:\n"
        "    Sandbox(workers=1, timeout=10, lazy_preload=())\n"
        "    print('STARTED')\n"
        "except SandboxUnavailableError as e:\n"
        "    print('REFUSED', e)\n")
    # The copy's mtime differs from the cached .pyc's, so the import must read the 0600 source.
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f'mount --bind "{copy}" "{target}" && exec "{sys.executable}" -I -c "$0"', script]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert "REFUSED" in p.stdout, (p.stdout, p.stderr[-2000:])
    assert "textwrap" in p.stdout and "probe" in p.stdout


# ------------------------------------------------------------------ the earlier regressions still hold

def test_hook_state_cannot_be_changed_from_a_traceback(hooked):
    """The hook's frame is in the traceback of a refused open(); its helpers keep no mutable state
    (every default is in an immutable tuple)."""
    program = prog("""
try:
    open('/etc/hostname')
except PermissionError as e:
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    loc = tb.tb_frame.f_locals
    for fn in (loc['_norm'], loc['_inside']):
        kw = fn.__kwdefaults__ or {}
        if '_cwd' in kw:
            kw['_cwd'] = '/'
        for cell in fn.__closure__ or ():
            try:
                cell.cell_contents = '/'
            except Exception:
                pass
        try:
            fn.__defaults__ = tuple('/' if isinstance(d, str) else d for d in fn.__defaults__ or ())
        except PermissionError:
            pass
        try:
            fn.__code__ = (lambda *a, **k: '/etc/hostname').__code__
        except (PermissionError, ValueError):
            pass
return float(len(open('/etc/hostname').read()))
""")
    res = hooked.run_programs_detailed([program, prog("return 6 * 7")])
    assert res[0].value is None and "sandbox: open() outside" in res[0].detail, res[0]
    assert res[1].value == 42.0


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
    with Sandbox(workers=1, timeout=PATIENT, **kw) as pool:
        start = time.monotonic() - t0
        assert pool.run_programs([prog("return 1")]) == [1.0]
        assert pool.run_programs(programs) == [3.0, 2.25, 6.0, 4.0]
    assert start < 10.0  # the import is paid once per worker (0.4-0.6 s on 2 cores)


def test_missing_preload_module_is_skipped_with_a_warning():
    with pytest.warns(RuntimeWarning, match="carft_no_such_module"):
        with Sandbox(workers=1, timeout=PATIENT, preload=("math", "carft_no_such_module"),
                     lazy_preload=("carft_no_such_lazy",)) as pool:
            errors = pool.layers["errors"]
            assert "preload carft_no_such_module" in errors
            assert pool.run_programs([prog("return math.sqrt(16)")]) == [4.0]


def test_an_interpreter_under_tmp_keeps_its_packages(tmp_path, monkeypatch):
    """CI's venv lives under /tmp (mktemp -d, mode 0700): a package of that venv is still in the
    root (at its own path), preloaded and lazily imported packages load, and programs cannot write
    there."""
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
    monkeypatch.setattr(sys, "path", [site_dir] + sys.path)
    with Sandbox(workers=1, timeout=PATIENT, preload=DEFAULT_PRELOAD + (f"carft_probe_{token}",),
                 lazy_preload=(f"carft_lazy_{token}",), packages=()) as pool:
        assert pool.layers["minimal_root"]
        got = pool.run_programs([
            prog(f"return carft_probe_{token}.VALUE", f"import carft_probe_{token}\n"),
            prog(f"import carft_lazy_{token}\nreturn carft_lazy_{token}.VALUE"),
            prog(f"open({site_dir + '/evil.py'!r}, 'w').write('x')\nreturn 1"),
        ])
    assert got == [17.5, 4.25, None]
    assert not os.path.exists(os.path.join(site_dir, "evil.py"))
