import os
import sys
from pathlib import Path

# Nothing may come from a model hub: every model in the tests is built on the spot.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted from its GGUF once)."""
    from machinery import convert
    return convert.embedded_model_dir()
