"""Data: records, loaders (GSM8K, SVAMP, synthetic), ReFT templates, tokenizers and collators."""

from .collate import SFTExample, collate_prompts, collate_sft, encode_prompt, encode_sft, encode_sft_batch
from .loaders import DataNotFoundError, load_dataset, load_file, load_from_config, read_file_records
from .records import DataError, Record, parse_answer_value
from .synthetic import make_synthetic, synthetic_split
from .templates import (ANSWER_TRIGGER, COT_TRIGGER, PROMPT_PREFIX, build_generation_prefix, build_prompt,
                        build_target, program_from_generation, python_header)
from .tokenizers import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ANSWER_TRIGGER", "COT_TRIGGER", "PROMPT_PREFIX", "CharTokenizer", "DataError", "DataNotFoundError",
    "HFTokenizer", "Record", "SFTExample", "Tokenizer", "build_generation_prefix", "build_prompt", "build_target",
    "collate_prompts", "collate_sft", "encode_prompt", "encode_sft", "encode_sft_batch", "load_dataset",
    "load_file", "load_from_config", "load_tokenizer", "make_synthetic", "parse_answer_value",
    "program_from_generation",
    "python_header", "read_file_records", "synthetic_split",
]
