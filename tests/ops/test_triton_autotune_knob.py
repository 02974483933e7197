"""The autotune knob of kernels/triton/cot_head.py: CARFT_TRITON_AUTOTUNE=0 or set_autotune(False)
launches each kernel's first config directly (tests), else the autotuner picks (benchmarks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from carft_mega._ext import triton_kernels

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
from carft_mega._ext import triton_kernels
m = triton_kernels("cot_head")
print(m.autotune_enabled(), [len(k.configs) for k in m._TUNED.values()])
"""


@pytest.mark.parametrize("value,enabled", [(None, True), ("0", False), ("off", False)])
def test_environment_variable_sets_the_default(value, enabled):
    """Compiled mode (no TRITON_INTERPRET, no GPU needed to import): every config stays in the lists,
    and the variable only decides whether the autotuner runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CARFT_TRITON_AUTOTUNE")}
    if value is not None:
        env["CARFT_TRITON_AUTOTUNE"] = value
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    flag, lens = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert flag == str(enabled)
    assert all(int(n) > 1 for n in lens.strip("[]").split(",")), lens  # a choice to pin: fwd, bwd, dW


class _FakeAutotuner:
    """Stands in for a triton Autotuner: records whether it or its JITFunction was launched."""

    def __init__(self, configs):
        self.configs, self.calls = configs, []
        outer = self

        class _Fn:
            def __getitem__(self, grid):
                return lambda *a, **kw: outer.calls.append(("fn", grid, a, kw))

        self.fn = _Fn()

    def __getitem__(self, grid):
        def run(*a, **kw):
            self.calls.append(("autotuner", grid, a, kw))
            self.best_config = self.configs[1]  # pretend the second one won
        return run


def test_launch_runs_first_config_when_pinned(monkeypatch):
    m = triton_kernels("cot_head")
    cfgs = [triton.Config({"BLOCK_H": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_H": 128}, num_warps=4, num_stages=3)]
    fake = _FakeAutotuner(cfgs)
    monkeypatch.setattr(m, "_last_config", {})
    before = m.autotune_enabled()
    try:
        m.set_autotune(False)
        assert not m.autotune_enabled()
        m._launch("fwd", fake, (3, 2), "x", T=5)
        assert fake.calls == [("fn", (3, 2), ("x",), {"T": 5, "BLOCK_H": 64, "num_warps": 8, "num_stages": 4})]
        assert m.chosen_configs()["fwd"] == str(cfgs[0])
        assert m.chosen_configs()["bwd"] == "-"

        m.set_autotune(True)
        m._launch("fwd", fake, (3, 2), "x", T=5)
        assert fake.calls[-1] == ("autotuner", (3, 2), ("x",), {"T": 5})
        assert m.chosen_configs()["fwd"] == str(cfgs[1])
    finally:
        m.set_autotune(before)
