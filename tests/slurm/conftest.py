import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(REPO, "tests", "slurm", "local_cluster.sh")

# CI installs SLURM itself (.ci/run) and sets this: there a missing cluster is a failure, not a skip.
REQUIRED = os.environ.get("MEGATRON_BLOOM_REQUIRE_SLURM") == "1"


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
    return {"tokenizer": tok, "data_path": prefix + "_text_document", "jsonl": jsonl}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    if os.geteuid() != 0 and not REQUIRED:
        pytest.skip("SKIPPED (not root): the local SLURM cluster needs root to install Debian's munge/slurmctld/"
                    "slurmd/slurm-client and to run slurmd")
    # A short path: munge's socket path must stay under the 108-byte limit of a unix socket.
    root = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", CLUSTER, "start", str(root), "2"], capture_output=True, text=True, timeout=900)
    if p.returncode == 77 and not REQUIRED:
        pytest.skip("SKIPPED (cannot install SLURM here): " + (p.stderr.strip().splitlines() or ["?"])[-1])
    try:
        assert p.returncode == 0, f"local cluster did not start:\n{p.stdout}\n{p.stderr}"
        conf = dict(line.split("=", 1) for line in p.stdout.split() if "=" in line)["SLURM_CONF"]
        extensions = request.getfixturevalue("torch_extensions")  # only once the cluster is known to run
        yield {"root": root, "env": dict(os.environ, SLURM_CONF=conf), "extensions": extensions}
    finally:
        stop = subprocess.run(["bash", CLUSTER, "stop", str(root)], capture_output=True, text=True, timeout=180)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="session")
def torch_extensions(tmp_path_factory):
    """DeepSpeed's CPU comm op, built here into a private TORCH_EXTENSIONS_DIR before any job starts.

    Jobs would otherwise build it in the shared ~/.cache on first use, and a job cancelled while
    building leaves torch's lock file behind: every later DeepSpeed start on the machine then waits
    on it forever (seen here when a cancelled run left one). Private and prebuilt, the jobs only load it.
    Built once per session: every module's cluster (test_slurm.py, test_corpus_slurm.py) loads the same build.
    """
    d = str(tmp_path_factory.mktemp("torch_extensions"))
    code = ("from deepspeed.accelerator import get_accelerator; "
            "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=REPO,
                       env=dict(os.environ, TORCH_EXTENSIONS_DIR=d, DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return d
