"""The commands of the prepared GPU run, checked on the CPU (slower than tests/test_gpu_check.py: they
start pytest, the trainer's config loader and the benchmark scripts): the files and tests they name exist,
the pytest selections of part 1 hold the GPU tests, the trainer overrides load, and the benchmark
scripts run their own code paths (the kernels under the Triton interpreter) before they meet a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check as gc  # noqa: E402

SHA = "cafe1234"
pytestmark = pytest.mark.slow


def test_commands_name_files_tests_and_configs_that_exist(tmp_path):
    from carft_mega.config import load_config

    for part in (1, 2):
        for s in gc.plan(part, tmp_path):
            for arg in s.argv:
                if arg.startswith(("tests/", "benchmarks/", "examples/")) or arg == "setup.py":
                    assert (REPO / arg).exists(), f"step {s.name}: {arg} does not exist"
            if "carft_mega.train" in s.argv:  # the trainer's overrides load (field names, values)
                rest = s.argv[s.argv.index("carft_mega.train") + 1:]
                path = None
                if rest[0] == "--config":
                    path, rest = str(REPO / rest[1]), rest[2:]
                load_config(path, rest)


def test_test_steps_select_the_gpu_tests(tmp_path):
    """The pytest commands of part 1, collected here: the GPU tests the issue asks for are in them."""
    wanted = {"test_triton": ["test_cot_head.py::test_gpu_bf16_real_shapes", "test_cot_head.py::test_gpu_int64_offsets",
                              "test_advantages.py::test_kernel_int64_offsets_on_gpu", "test_cot_head.py::test_gpu[",
                              "test_cuda_compile.py::test_lcs_launcher_links"],
              "test_ext": ["test_lcs.py::test_cuda_bit_exact_vs_reference_64x1024",
                           "test_gpu_kernels_step.py::test_one_step_fused_matches_reference_gpu",
                           "test_mcore_gpu.py::test_bf16_tiny_policy_matches_hf"]}
    for s in gc.plan(1, tmp_path):
        if s.name not in wanted:
            continue
        argv = [a for a in s.argv[s.argv.index("pytest") + 1:] if a != "-v"]
        for flag in ("-n", "--dist", "--junitxml"):  # run options, not selection
            while flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env={**os.environ, **s.env})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ids = proc.stdout
        for w in wanted[s.name]:
            assert w in ids, f"step {s.name} does not select {w}"
        assert "test_kernels_compile_for_sm90" not in ids and "gloo" not in ids  # CPU-side, run in CI


def test_benchmarks_run_their_gpu_code_on_cpu(tmp_path):
    """bench_cot_head and bench_advantages with --cpu-smoke (the Triton interpreter, one call per timing)
    and bench_lcs's CPU rows, from outside the repository: the scripts' own code paths, CSV and RESULT
    lines, before they meet a GPU. bench_lcs's CUDA rows and all timings need the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CARFT_GIT_SHA"] = SHA
    runs = {
        "cot_head": ["--cpu-smoke", "--shapes", "16x40", "--N", "2", "--passes", "fwd+bwd", "--dtype", "fp32"],
        "advantages": ["--cpu-smoke", "--batch", "3", "--seq", "40", "--sweep-block-t"],
        "lcs": ["--no-ref", "--pairs", "4", "--lengths", "64"],
    }
    for name, args in runs.items():
        csv = tmp_path / f"{name}.csv"
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"bench_{name}.py"), *args, "--csv", str(csv)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"bench_{name}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        rows = csv.read_text().splitlines()
        assert len(rows) >= 2 and SHA in rows[1], rows[:2]
        if name != "lcs":
            assert "RESULT" in proc.stdout, proc.stdout[-2000:]
    assert "configs" in (tmp_path / "cot_head.csv").read_text().splitlines()[0]
