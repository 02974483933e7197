"""The three conversion CLIs, run as a user would (single process, TP=1; the TP=2 path runs under
torchrun in tests/distributed/test_model_parallel.py):

    convert_hf_to_megatron.py -> convert_megatron_to_hf.py gives back the HF weights bit for bit,
    with the tokenizer files and the CoT head (v_head.safetensors) carried through;
    compare_logits.py reports KL < 1e-6 and fails above --max-kl.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.mcore_helpers import tiny_arch, tiny_hf_model, tp1  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 203


def tiny_tokenizer():
    """A word-level tokenizer built in code (no files needed): 200 words + 3 specials = 203 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def run_tool(name: str, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Qwen2 (untied, QKV bias, GQA) HF directory with a tokenizer and a CoT head."""
    d = tmp_path_factory.mktemp("hf")
    model = tiny_hf_model(tiny_arch("qwen2", tied=False), seed=11)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    head = {"v_head.proj.weight": torch.randn(64, 64, generator=g), "v_head.proj.bias": torch.randn(64, generator=g),
            "v_head.summary.weight": torch.randn(1, 64, generator=g), "v_head.summary.bias": torch.randn(1, generator=g)}
    save_file(head, str(d / "v_head.safetensors"))
    return d


@pytest.fixture(scope="module")
def cli_ckpt(hf_dir, tmp_path_factory):
    """``convert_hf_to_megatron.py`` run once on the tiny HF directory."""
    ckpt = tmp_path_factory.mktemp("cli") / "mcore"
    out = run_tool("convert_hf_to_megatron.py", "--hf", str(hf_dir), "--out", str(ckpt), "--tp", "1").stdout
    assert "wrote Megatron checkpoint" in out
    return ckpt


def test_round_trip_through_the_clis(hf_dir, cli_ckpt, tmp_path):
    info = json.loads((cli_ckpt / "carft_arch.json").read_text())
    assert info["cot_head"] == "loaded" and info["padded_vocab_size"] == 256 and info["tokenizer"] == "tokenizer"
    back = tmp_path / "hf_back"
    run_tool("convert_megatron_to_hf.py", "--ckpt", str(cli_ckpt), "--out", str(back))

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    src, got = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    head_src, head_got = load_file(str(hf_dir / "v_head.safetensors")), load_file(str(back / "v_head.safetensors"))
    assert set(head_src) == set(head_got) and all(torch.equal(head_src[k], head_got[k]) for k in head_src)
    model = AutoModelForCausalLM.from_pretrained(back)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.eos_token_id == 2
    ref = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.tensor([[1, 5, 9, 44, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # copied verbatim through the checkpoint
        assert (back / f).read_bytes() == (hf_dir / f).read_bytes(), f
    tok = PreTrainedTokenizerFast.from_pretrained(back)
    assert tok("w0 w5 w7")["input_ids"] == [3, 8, 10]


def test_compare_logits_cli(hf_dir, cli_ckpt):
    res = run_tool("compare_logits.py", "--hf", str(hf_dir), "--ckpt", str(cli_ckpt), "--json", "--max-kl", "1e-6",
                   "--prompt", "w1 w2 w3 w4", "--prompt", "w9 w8").stdout
    stats = json.loads([x for x in res.splitlines() if x.startswith("{")][-1])
    assert stats["kl_max"] < 1e-6 and stats["positions"] == 6, stats


def test_compare_logits_fails_on_other_weights(cli_ckpt, tmp_path):
    """Same architecture, other weights: compare_logits must notice and exit 1."""
    other = tmp_path / "other_hf"
    tiny_hf_model(tiny_arch("qwen2", tied=False), seed=12).save_pretrained(other)
    proc = run_tool("compare_logits.py", "--hf", str(other), "--ckpt", str(cli_ckpt), "--max-kl", "1e-6",
                    expect_ok=False)
    assert proc.returncode == 1 and "FAIL: kl_max" in proc.stderr, proc.stderr[-3000:]


def test_tp_without_torchrun_is_a_clear_error(hf_dir, tmp_path):
    proc = run_tool("convert_hf_to_megatron.py", "--hf", str(hf_dir), "--out", str(tmp_path / "x"), "--tp", "2",
                    expect_ok=False)
    assert proc.returncode != 0 and "torchrun --nproc_per_node 2" in proc.stderr


def test_bf16_conversion_in_process(tp1, hf_dir, tmp_path):
    """--dtype bf16: the checkpoint holds bf16 weights; the export equals the HF weights cast to bf16."""
    from carft_mega.models.pipelines import convert_hf_to_megatron, convert_megatron_to_hf

    convert_hf_to_megatron(hf_dir, tmp_path / "ck", dtype="bf16")
    convert_megatron_to_hf(tmp_path / "ck", tmp_path / "back")
    src, got = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k].to(torch.bfloat16)) for k in src)


def test_convert_takes_d_from_the_saved_head(tp1, hf_dir, tmp_path):
    """The hf_dir head has d = 64: --cot-proj-dim only applies to a freshly initialised head."""
    from carft_mega.models.pipelines import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, tmp_path / "ck", cot_proj_dim=16)
    info = json.loads((tmp_path / "ck" / "carft_arch.json").read_text())
    assert info["cot_proj_dim"] == 64 and info["cot_head"] == "loaded"
    assert info["hf_token_ids"] == {"bos_token_id": 1, "eos_token_id": 2} and info["dtype"] == "fp32"


def test_trainer_checkpoint_exports_token_ids_and_dtype(tp1, tmp_path):
    """save_engine (the trainer's checkpoint) -> convert_megatron_to_hf keeps the source's bos/eos/pad
    ids and the bf16 dtype. A checkpoint without ids takes its tokenizer's, else leaves them unset
    (never transformers' Llama defaults bos 1 / eos 2)."""
    from transformers import AutoConfig

    from carft_mega.config import OptimConfig
    from carft_mega.models.build import build_policy
    from carft_mega.models.pipelines import convert_megatron_to_hf
    from carft_mega.trainer.engine import build_engine, save_engine
    from tests.models.mcore_helpers import model_cfg

    src = tmp_path / "hf"
    hf = tiny_hf_model(tiny_arch("llama", tied=True), seed=3)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 5, 7, 9
    hf.save_pretrained(src)
    policy = build_policy(model_cfg(source="hf", path=str(src), dtype="bf16"))
    engine = build_engine(policy, OptimConfig(), peak_lr=1e-4, schedule="constant", warmup_ratio=0.0, total_steps=1,
                          distributed_optimizer=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_engine(engine, str(ckpt))
    convert_megatron_to_hf(ckpt, tmp_path / "out")
    cfg = AutoConfig.from_pretrained(tmp_path / "out")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (5, 7, 9)
    assert cfg.dtype == torch.bfloat16
    got, want = load_file(str(tmp_path / "out" / "model.safetensors")), hf.state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16()) for k in got)

    # An older checkpoint without the ids: none from the tokenizer-less checkpoint ...
    info = json.loads((ckpt / "carft_arch.json").read_text())
    del info["hf_token_ids"]
    (ckpt / "carft_arch.json").write_text(json.dumps(info))
    convert_megatron_to_hf(ckpt, tmp_path / "out2")
    cfg = AutoConfig.from_pretrained(tmp_path / "out2")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, None, None)
    # ... and its tokenizer's when it has one.
    tok = tiny_tokenizer()
    tok.bos_token, tok.eos_token, tok.pad_token = "w2", "w3", "w4"  # ids 5, 6, 7
    tok.save_pretrained(ckpt / "tokenizer")
    (ckpt / "carft_arch.json").write_text(json.dumps({**info, "tokenizer": "tokenizer"}))
    convert_megatron_to_hf(ckpt, tmp_path / "out3")
    cfg = AutoConfig.from_pretrained(tmp_path / "out3")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (5, 6, 7)
