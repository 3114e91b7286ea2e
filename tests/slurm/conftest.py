import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def slurm_corpus(tmp_path_factory):
    """A 1 MB multilingual corpus, a 1,000-token tokenizer and its .bin/.idx, for the tiny CPU runs."""
    d = tmp_path_factory.mktemp("slurm_corpus")
    jsonl, tok, prefix = str(d / "corpus.jsonl"), str(d / "tok"), str(d / "corpus")

    def tool(*args):
        subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, cwd=REPO, timeout=300)

    tool("data_tools/make_corpus.py", "--output", jsonl, "--size-mb", "1", "--seed", "3")
    tool("data_tools/train_tokenizer.py", "--input", jsonl, "--vocab-size", "1000", "--output-dir", tok)
    tool("data_tools/preprocess_data.py", "--input", jsonl, "--output-prefix", prefix, "--tokenizer-name-or-path", tok,
         "--json-keys", "text", "--append-eod", "--workers", "1", "--quiet")
    return {"tokenizer": tok, "data_path": prefix + "_text_document"}
