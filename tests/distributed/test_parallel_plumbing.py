"""carft_mega.parallel in a single process (no launcher) and the CPU shim's remappings.
The 2-rank layouts run in test_model_parallel.py."""

import ast
import os

import pytest
import torch

from carft_mega import parallel
from carft_mega.config import ParallelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is never applied with CUDA")


def test_single_process_init_getters_and_destroy():
    parallel.init_distributed(ParallelConfig(tp=1), seed=3)
    try:
        assert parallel.is_initialized()
        assert (parallel.tp_size(), parallel.dp_size(), parallel.tp_rank(), parallel.dp_rank()) == (1, 1, 0, 0)
        assert parallel.tp_group().size() == 1 and parallel.dp_group().size() == 1
        assert not parallel.sequence_parallel()
        assert parallel.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
        with pytest.raises(RuntimeError, match="already called"):
            parallel.init_distributed(ParallelConfig(tp=1), seed=3)
        # Seeds are set: the same seed gives the same draws.
        a = torch.rand(3)
        parallel.set_seed(3)
        assert torch.equal(torch.rand(3), a)
    finally:
        parallel.destroy()
    assert not parallel.is_initialized()
    parallel.destroy()  # idempotent
    with pytest.raises(RuntimeError, match="has not been called"):
        parallel.tp_group()


def test_bad_layouts_name_the_field():
    with pytest.raises(ValueError, match="parallel.tp' = 2: the world size 1 is not a multiple"):
        parallel.init_distributed(ParallelConfig(tp=2), seed=0)
    parallel.destroy()
    with pytest.raises(ValueError, match="parallel.sequence_parallel"):
        parallel.init_distributed(ParallelConfig(tp=1, sequence_parallel=True), seed=0)
    parallel.destroy()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="parallel.backend' = 'nccl'"):
            parallel.init_distributed(ParallelConfig(backend="nccl"), seed=0)


def test_reinit_keeping_the_process_group():
    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    import torch.distributed as dist

    pg = dist.group.WORLD
    parallel.destroy(keep_process_group=True)
    assert dist.is_initialized()
    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    assert dist.group.WORLD is pg
    parallel.destroy()
    assert not dist.is_initialized()


def test_the_shim_is_only_imported_behind_a_cuda_check():
    """The GPU path never imports carft_mega._cpu_shim: its only import sits in ensure_cpu_shim()."""
    hits = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "carft_mega")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            tree = ast.parse(open(path).read())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.ImportFrom):
                    names = [a.name for a in node.names] + [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if any(n.endswith("_cpu_shim") for n in names):
                    hits.append((os.path.relpath(path, ROOT), node.lineno))
    assert [h[0] for h in hits] == ["carft_mega/parallel.py"], hits
    src = open(os.path.join(ROOT, "carft_mega", "parallel.py")).read()
    func = src[src.index("def ensure_cpu_shim"):src.index("def _resolve_backend")]
    assert "if not torch.cuda.is_available():" in func and "_cpu_shim" in func


@cpu_only
def test_shim_remaps_cuda_requests_to_the_cpu():
    from carft_mega import _cpu_shim

    parallel.ensure_cpu_shim()
    _cpu_shim.apply()  # idempotent
    assert _cpu_shim.is_applied()
    assert torch.cuda.current_device() == torch.device("cpu")
    for dev in ("cuda", "cuda:0", torch.device("cuda", 0), 0):
        assert torch.zeros(2, device=dev).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x and x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor" and x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64  # type(dtype) is untouched
    assert torch.tensor([1.0], device="cuda", pin_memory=True).device.type == "cpu"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    torch.cuda.synchronize()
    assert end.elapsed_time(start) <= 0 <= start.elapsed_time(end)


@cpu_only
def test_shim_rng_tracker_forks_the_cpu_generator():
    """Megatron's model-parallel RNG tracker works on the CPU generator and restores the outer state."""
    from megatron.core import tensor_parallel

    parallel.init_distributed(ParallelConfig(tp=1), seed=11)
    try:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        outer = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outer)
        with tracker.fork():
            b = torch.rand(4)
        assert not torch.equal(a, b)  # the tracked stream advanced
        parallel.set_seed(11)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(4), a)  # reproducible from the seed
    finally:
        parallel.destroy()
