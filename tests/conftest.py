import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reference import build_hf_model, save_hf_checkpoint, to_transformers4_dialect  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(checkpoint dir, float32 eager transformers model) for the tiny random-weight Gemma 3n."""
    model = build_hf_model()
    path = save_hf_checkpoint(model, tmp_path_factory.mktemp("tiny_hf"))
    return path, model


@pytest.fixture(scope="session")
def tiny_hf_v4(tiny_hf, tmp_path_factory):
    """The same weights in the 2025 transformers-4 dialect (rope_theta, k/v for shared layers)."""
    path, model = tiny_hf
    return to_transformers4_dialect(path, tmp_path_factory.mktemp("v4") / "ckpt", model), model
