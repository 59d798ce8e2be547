"""Shared fixtures: the real default model is loaded once per test session."""
import pytest


@pytest.fixture(scope="session")
def default_lm():
    """SmolLM2-135M-Instruct (the embedded default model) as a LoadedModel, float32."""
    from llmkit.checkpoint import load_model

    return load_model("default", dtype="float32")
