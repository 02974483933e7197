"""Tokenizers behind one small protocol: a character-level one for the embedded synthetic task and
a wrapper around Hugging Face tokenizers for real checkpoints.

Conventions shared by every caller (SFT collation, rollouts, rewards):
    * ``encode`` never adds special tokens (ReFT tokenises with ``add_special_tokens=False``; no BOS).
    * EOS is appended explicitly by ``collate.encode_sft``; generation stops at ``eos_id``.
    * ``decode(..., skip_special_tokens=True)`` drops pad/EOS (ReFT decodes the same way).
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data, rollout and reward code needs from a tokenizer."""

    name: str
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped when ``skip_special_tokens``."""
        ...


# Newline, then printable ASCII in code-point order (space .. '~'): covers the synthetic generator,
# ReFT's templates and python code.
CHAR_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer:
    """Character-level tokenizer with a fixed alphabet (newline + the 95 printable ASCII chars).

    Ids: 0 = pad, 1 = eos, 2 = unk, 3 = newline, then 4..98 = ' '..'~' in code-point order (vocab_size 99).

    Unknown characters (anything outside the alphabet, e.g. ``’`` or a non-breaking space in GSM8K)
    raise a ``ValueError`` naming the character and its position, so that a dataset that does not
    fit the tokenizer fails loudly instead of training on corrupted text. Pass ``unknown="unk"``
    to map them to the unk id instead (decoded as U+FFFD).
    """

    PAD, EOS, UNK = 0, 1, 2
    _SPECIAL_TEXT = {0: "<pad>", 1: "<eos>", 2: "<unk>"}

    def __init__(self, unknown: str = "error"):
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown must be 'error' or 'unk', got {unknown!r}")
        self.unknown = unknown
        self.name = "char"
        self.pad_id = self.PAD
        self.eos_id = self.EOS
        self.unk_id = self.UNK
        self._stoi = {c: i + 3 for i, c in enumerate(CHAR_ALPHABET)}
        self._itos = {i: c for c, i in self._stoi.items()}
        self.vocab_size = 3 + len(CHAR_ALPHABET)

    def encode(self, text: str) -> list[int]:
        """One id per character. Raises ValueError on an unknown character (see class doc)."""
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        ids = []
        for pos, c in enumerate(text):
            i = stoi.get(c)
            if i is None:
                if self.unknown == "error":
                    raise ValueError(f"CharTokenizer: character {c!r} (U+{ord(c):04X}) at position {pos} of "
                                     f"{text[max(0, pos - 20):pos + 20]!r} is not in its alphabet "
                                     f"(printable ASCII and newline); use CharTokenizer(unknown='unk') "
                                     f"or an HF tokenizer") from None
                i = self.UNK
            ids.append(i)
        return ids

    def to_hf(self):
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (what an HF export of a
        model trained with it carries, so that ``AutoTokenizer.from_pretrained`` loads it).

        Same ids for every text in the alphabet: every character is its own pre-token, looked up
        in a word-level vocabulary (unknown characters -> ``<unk>``), decoded by concatenation. One
        difference: the literal texts ``<pad>``/``<eos>``/``<unk>`` are special tokens there.
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Tokenizer
        from transformers import PreTrainedTokenizerFast

        vocab = {text: i for i, text in self._SPECIAL_TEXT.items()}
        vocab.update(self._stoi)
        tok = _Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                       unk_token="<unk>", clean_up_tokenization_spaces=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Specials are dropped, or rendered as ``<pad>``/``<eos>``/``<unk>``."""
        out = []
        for i in ids:
            i = int(i)
            c = self._itos.get(i)
            if c is not None:
                out.append(c)
            elif i in self._SPECIAL_TEXT:
                if i == self.UNK:
                    out.append("\ufffd" if skip_special_tokens else "<unk>")
                elif not skip_special_tokens:
                    out.append(self._SPECIAL_TEXT[i])
            else:
                raise ValueError(f"CharTokenizer: id {i} is outside the vocabulary [0, {self.vocab_size})")
        return "".join(out)


class HFTokenizer:
    """A ``transformers.AutoTokenizer`` behind the ``Tokenizer`` protocol.

    Args:
        path: a tokenizer directory (``tokenizer.json`` ...), or a ``.gguf`` file, or a directory
            together with ``gguf_file``.
        gguf_file: file name of a GGUF checkpoint inside ``path`` whose embedded vocabulary to use.
        eos_id: override the tokenizer's EOS id (e.g. ``<|im_end|>`` for instruct checkpoints).
        pad_id: override the pad id. Without one the tokenizer's pad is used, falling back to EOS
            (GPT-2 has no pad token); padding is always masked, so sharing the id is harmless.
    """

    def __init__(self, path: str, gguf_file: str | None = None, *, eos_id: int | None = None,
                 pad_id: int | None = None):
        from transformers import AutoTokenizer  # heavy import, only when an HF tokenizer is used

        if gguf_file is None and str(path).endswith(".gguf") and os.path.isfile(path):
            path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self._tok = AutoTokenizer.from_pretrained(path, **kwargs)
        self.name = f"{path}/{gguf_file}" if gguf_file else str(path)
        eos = eos_id if eos_id is not None else self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {self.name!r} defines no EOS token; pass eos_id=")
        pad = pad_id if pad_id is not None else self._tok.pad_token_id
        self.eos_id = int(eos)
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.vocab_size = len(self._tok)  # includes added special tokens
        self._special = set(self._tok.all_special_ids) | {self.eos_id, self.pad_id}

    @property
    def hf_tokenizer(self):
        """The wrapped ``transformers`` tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (``add_special_tokens=False``, as ReFT)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; pad and EOS count as special even when overridden."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | None, gguf_file: str | None = None) -> Tokenizer:
    """``CharTokenizer()`` for None (or ``"char"``), else an ``HFTokenizer`` for ``path``."""
    if path is None or path == "char":
        return CharTokenizer()
    return HFTokenizer(path, gguf_file=gguf_file)
