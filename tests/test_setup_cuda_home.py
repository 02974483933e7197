"""setup.py's CUDA toolkit lookup: the first candidate folder that holds include/cuda_runtime.h.

torch's own lookup takes the parent of the `nvcc` on PATH; a wrapper script there (as /usr/local/bin/nvcc
on the dev and GPU machines) gives a folder without headers. The lookup functions are read out of
setup.py with `ast` and run in a namespace whose fixed roots point into tmp_path, so the test does not
depend on the toolkits installed on the machine (setup.py itself cannot be imported: it runs setup()).
"""

import ast
import glob
import os
import shutil
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ("_has_cuda_headers", "_cuda_home_candidates", "_find_cuda_home")


def _lookup(roots, site_dirs):
    tree = ast.parse((REPO / "setup.py").read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in NAMES]
    assert sorted(f.name for f in funcs) == sorted(NAMES), "setup.py lost one of the lookup functions"
    ns = {"os": os, "glob": glob, "shutil": shutil, "sys": types.SimpleNamespace(path=list(site_dirs)),
          "_CUDA_ROOTS": tuple(str(r) for r in roots)}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def _toolkit(path: Path) -> Path:
    (path / "include").mkdir(parents=True)
    (path / "include" / "cuda_runtime.h").write_text("/* test */\n")
    (path / "bin").mkdir()
    nvcc = path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    return path


def _wrapper(path: Path, target: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "include").mkdir()  # a folder with an include/ but without the CUDA headers, as /usr/local
    nvcc = path / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\nexec {target}/bin/nvcc \"$@\"\n")
    nvcc.chmod(0o755)
    return nvcc


def test_wrapper_nvcc_on_path_falls_through_to_a_versioned_toolkit(tmp_path, monkeypatch):
    old, new = _toolkit(tmp_path / "cuda-12.8"), _toolkit(tmp_path / "cuda-13.0")
    _wrapper(tmp_path / "local", new)
    monkeypatch.setenv("PATH", str(tmp_path / "local" / "bin"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    ns = _lookup([tmp_path / "no-cuda", tmp_path / "cuda-*"], [])
    cands = ns["_cuda_home_candidates"]()
    assert str(tmp_path / "local") in cands  # torch's pick, considered and rejected
    assert not ns["_has_cuda_headers"](str(tmp_path / "local"))
    assert ns["_find_cuda_home"]() == str(new)  # the newest versioned toolkit, not 12.8
    assert cands.index(str(new)) < cands.index(str(old))


def test_cuda_home_without_headers_is_skipped(tmp_path, monkeypatch):
    good = _toolkit(tmp_path / "toolkit")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_PATH", str(good))
    ns = _lookup([], [])
    assert ns["_cuda_home_candidates"]()[:2] == [str(tmp_path / "empty"), str(good)]
    assert ns["_find_cuda_home"]() == str(good)
    monkeypatch.setenv("CUDA_HOME", str(good))  # a good CUDA_HOME wins over everything else
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "empty"))
    assert ns["_find_cuda_home"]() == str(good)


def test_symlinked_nvcc_and_pip_wheel_layouts(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    real = _toolkit(tmp_path / "opt" / "cuda")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    ns = _lookup([], [])
    assert ns["_find_cuda_home"]() == str(real)  # through the symlink

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    site = tmp_path / "site-packages"
    wheel = _toolkit(site / "nvidia" / "cu13")
    ns = _lookup([tmp_path / "absent"], [site])
    assert ns["_find_cuda_home"]() == str(wheel)
    ns = _lookup([tmp_path / "absent"], [tmp_path / "other-site"])
    assert ns["_find_cuda_home"]() is None


def test_setup_sets_cuda_home_before_importing_cpp_extension():
    """torch.utils.cpp_extension reads CUDA_HOME once, at import: the lookup must come first."""
    src = (REPO / "setup.py").read_text()
    body = src[src.index("def _extensions():"):]
    assert body.index('os.environ["CUDA_HOME"] = cuda_home') < body.index("from torch.utils import cpp_extension")
