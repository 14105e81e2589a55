import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides at import whether its own library functions (tl.zeros, ...) run under the interpreter:
    # set the switch before any test module can import triton (transformers may, at collection time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    """The generator's tokenizer, or a tokenizer folder named by BLOCKRAG_TEST_TOKENIZER (a GPU machine
    without the model package)."""
    path = os.environ.get("BLOCKRAG_TEST_TOKENIZER")
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from blockrag.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def scifact_dir():
    path = SHARED / "scifact"
    if not (path / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {path}")
    return path
