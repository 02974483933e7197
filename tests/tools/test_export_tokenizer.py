"""The trainer's checkpoints and HF exports carry the tokenizer (issue 13, item 1), checked with plain
transformers. In its own module: it runs the trainer in process, which needs no parallel state,
while test_conversion_tools.py holds a module-wide one (the ``tp1`` fixture). The default GGUF
model's case runs through the example scripts in tests/trainer/test_examples.py."""

import json
import os

from tests.models.mcore_helpers import tiny_arch, tiny_hf_model
from tests.tools.test_conversion_tools import run_tool, tiny_tokenizer


def test_trainer_checkpoints_and_exports_carry_the_tokenizer(tmp_path):
    """A run from an HF directory: every checkpoint has the tokenizer (tokenizer/, copied verbatim),
    so model.source=mcore runs and convert_megatron_to_hf.py find it; the run's HF export loads with
    plain AutoModelForCausalLM + AutoTokenizer; every file follows the umask, none is 0600."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.trainer.test_e2e import run_in_process

    # A Llama (as SmolLM2): transformers 5 loads a Qwen2 directory's tokenizer as its own
    # Qwen2Tokenizer whatever tokenizer.json holds, which does not apply this word-level one.
    hf_dir = tmp_path / "hf"
    tiny_hf_model(tiny_arch("llama", tied=True), seed=11).save_pretrained(hf_dir)
    tiny_tokenizer().save_pretrained(hf_dir)
    out = tmp_path / "run"
    run_in_process(str(out), "model.source=hf", f"model.path={hf_dir}", "sft.max_steps=1", "ppo.enabled=false",
                   "checkpoint.export_hf=true")
    ckpt = out / "checkpoints" / "sft" / "step_00000001"
    assert json.loads((ckpt / "carft_arch.json").read_text())["tokenizer"] == "tokenizer"
    assert (ckpt / "tokenizer" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    export = out / "hf" / "sft"
    model, tok = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert type(model).__name__ == "LlamaForCausalLM" and tok("w0 w5 w7")["input_ids"] == [3, 8, 10]
    back = tmp_path / "back"
    run_tool("convert_megatron_to_hf.py", "--ckpt", str(ckpt), "--out", str(back))
    assert AutoTokenizer.from_pretrained(back)("w0 w5 w7")["input_ids"] == [3, 8, 10]
    mask = os.umask(0)
    os.umask(mask)
    for d in (ckpt, export, back):
        for root, _, files in os.walk(d):
            for f in files:
                assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o666 & ~mask, os.path.join(root, f)
