import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tool(*args):
    subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A 1 MB multilingual corpus, a 1,000-token BLOOM-style tokenizer, and its .bin/.idx."""
    d = tmp_path_factory.mktemp("corpus")
    jsonl, tok, prefix = str(d / "corpus.jsonl"), str(d / "tok"), str(d / "corpus")
    run_tool("data_tools/make_corpus.py", "--output", jsonl, "--size-mb", "1", "--seed", "3")
    run_tool("data_tools/train_tokenizer.py", "--input", jsonl, "--vocab-size", "1000", "--output-dir", tok)
    run_tool("data_tools/preprocess_data.py", "--input", jsonl, "--output-prefix", prefix,
             "--tokenizer-name-or-path", tok, "--json-keys", "text", "--append-eod", "--workers", "1", "--quiet")
    return {"jsonl": jsonl, "tokenizer": tok, "data_path": prefix + "_text_document"}
