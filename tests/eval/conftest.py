"""Session fixtures: HF_HOME in a temp dir (no cache in the home directory), one tiny model."""
import os

import pytest

from eval_helpers import build_tiny


@pytest.fixture(scope="session", autouse=True)
def _hf_home(tmp_path_factory):
    old = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    yield
    if old is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = old


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny transformers BLOOM folder with tokenizer, and a TP=2 native checkpoint of it."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))
