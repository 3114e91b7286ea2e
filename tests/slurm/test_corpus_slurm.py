"""slurm/preprocess.slurm on a real local SLURM (2 emulated nodes), through to a short pretraining run.

3 languages x 4 jsonl files, 2 files per array task: 6 shard tasks. Task 1 kills itself (SIGKILL,
through data_tools/corpus.py's test hook) after tokenizing the first of its two files; the job
script requeues it, and its rerun must write the same bytes as an uninterrupted run of the same
task. The merge job (afterok on the array) merges per language, checks the counts, writes
bigscience's ratios and split files; slurm/tiny-cpu.slurm (afterok on the merge) trains on them and
reports validation loss per language to TensorBoard.
"""
import json
import os
import subprocess
import sys
import time

import pytest
from slurm_helpers import REPO, gone, job_field, read, release_if_delayed, wait_for

from data_tools.corpus import split_files_text

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LANGS = ("en", "fr", "ru")
KILLED_TASK = 1  # en, files 2-3


def raw_corpus(jsonl, root):
    """LANG/fNN.jsonl: 4 files of 10 documents per language, from the session's synthetic corpus."""
    by_lang = {}
    with open(jsonl) as fh:
        for line in fh:
            by_lang.setdefault(json.loads(line)["lang"], []).append(line)
    for lang in LANGS:
        os.makedirs(root / lang)
        for i in range(4):
            (root / lang / f"f{i:02d}.jsonl").write_text("".join(by_lang[lang][10 * i:10 * i + 10]))
    return [f"{lang}={root / lang}" for lang in LANGS]


def test_corpus_array_merge_ratios_splits_and_pretraining(cluster, slurm_corpus, tmp_path):
    inputs = raw_corpus(slurm_corpus["jsonl"], tmp_path / "raw")
    out, run = tmp_path / "out", tmp_path / "run"
    env = dict(cluster["env"], PYTHON=sys.executable, PYTHONUNBUFFERED="1", INPUTS=" ".join(inputs),
               TOKENIZER=slurm_corpus["tokenizer"], OUT_DIR=str(out), FILES_PER_TASK="2", ALPHA="0.3",
               MEGATRON_BLOOM_CORPUS_KILL_TASK=str(KILLED_TASK))
    p = subprocess.run(["bash", os.path.join(REPO, "slurm", "preprocess.slurm")], capture_output=True, text=True,
                       env=env, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    array, merge = p.stdout.split()[-2:]
    # The training job waits on the merge (afterok), as a user would chain them.
    train_env = dict(cluster["env"], PYTHON=sys.executable, PYTHONUNBUFFERED="1", RUN_DIR=str(run),
                     TOKENIZER=slurm_corpus["tokenizer"], TRAIN_SPLITS_FILE=str(out / "train-splits.txt"),
                     VALID_SPLITS_FILE=str(out / "valid-splits.txt"), TORCH_EXTENSIONS_DIR=cluster["extensions"],
                     TRAIN_ITERS="4", EVAL_INTERVAL="2", EVAL_ITERS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        train_env.pop(k, None)
    train_log = str(tmp_path / "train-%j.out")
    t = subprocess.run(["sbatch", "--parsable", f"--output={train_log}", f"--dependency=afterok:{merge}",
                        os.path.join(REPO, "slurm", "tiny-cpu.slurm")], capture_output=True, text=True, env=train_env,
                       timeout=30, cwd=REPO)
    assert t.returncode == 0, t.stderr
    train = t.stdout.strip().split(";")[0]
    train_log = train_log.replace("%j", train)
    killed = f"{array}_{KILLED_TASK}"
    killed_log = str(out / "logs" / f"corpus-{array}_{KILLED_TASK}.out")
    try:
        # The killed task requeues itself; start it again without Slurm's ~2 min hold.
        wait_for(lambda: job_field(cluster, killed, "Restarts") == "1", 60, "task 1 to requeue", log_path=killed_log)
        requeued_at = time.monotonic()
        wait_for(lambda: (release_if_delayed(cluster, killed, requeued_at), gone(cluster, array))[1], 120,
                 "the shard array to finish", log_path=killed_log)
        wait_for(lambda: gone(cluster, merge), 60, "the merge job")
        wait_for(lambda: gone(cluster, train), 300, "the training job", log_path=train_log)
    finally:
        for job in (array, merge, train):
            subprocess.run(["scancel", job], env=cluster["env"], capture_output=True, timeout=30)

    log = read(killed_log)
    assert f"killing task {KILLED_TASK} after part 0" in log and "killed by signal 9: scontrol requeue" in log, log
    assert "restart 1)" in log and f"shard {KILLED_TASK} (en): done" in log, log
    merge_log = read(str(out / "logs" / f"corpus-merge-{merge}.out"))
    assert job_field(cluster, merge, "JobState") == "COMPLETED", merge_log
    for lang in LANGS:
        assert f"merged {lang}: 2 shards" in merge_log, merge_log

    # The rerun wrote the bytes an uninterrupted run of the same task writes.
    again = tmp_path / "again"
    for args in (["plan", "--input", *inputs, "--output-dir", str(again), "--tokenizer-name-or-path",
                  slurm_corpus["tokenizer"], "--files-per-task", "2"],
                 ["shard", "--plan", str(again / "plan.json"), "--task", str(KILLED_TASK), "--workers", "1"]):
        q = subprocess.run([sys.executable, "data_tools/corpus.py", *args], capture_output=True, text=True, cwd=REPO,
                           timeout=120)
        assert q.returncode == 0, q.stderr
    for ext in (".bin", ".idx"):
        name = f"shards/en/en_00001_text_document{ext}"
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert not (out / "shards" / "en" / "en_00001_text_document.parts").exists()

    ratios = json.loads((out / "ratios.json").read_text())
    assert [r["dataset_path"] for r in ratios] == [str(out / "merged" / lang / f"{lang}_text_document") for lang in LANGS]
    assert abs(sum(r["ratio"] for r in ratios) - 1) < 1e-12
    train_text, valid_text = split_files_text(ratios)
    assert (out / "train-splits.txt").read_text() == train_text
    assert (out / "valid-splits.txt").read_text() == valid_text

    tlog = read(train_log)
    assert job_field(cluster, train, "JobState") == "COMPLETED", tlog[-4000:]
    assert "> training done at iteration 4" in tlog, tlog[-4000:]
    for group in ("valid", *(f"valid_{lang}" for lang in LANGS)):
        assert f"| {group} lm loss value:" in tlog, group
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(run / "tensorboard"):
        if any(f.startswith("events.") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    for lang in LANGS:
        assert f"lm-loss-validation/valid_{lang}/lm loss validation" in tags, sorted(tags)
