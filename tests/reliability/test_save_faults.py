"""A save that cannot be written (disk full, unwritable --save): one clear error, no hang, and the
previous checkpoint stays the one to resume from."""
import hashlib
import os
import subprocess
import time

import pytest

from megatron_bloom.checkpoint.manager import SAVE_HOOK_ENV
from pretrain_run import REPO, command, env, pretrain
from reliability_job import Job, data_args


def digests(folder):
    """{relative path: sha256} of every file under a checkpoint folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return found


@pytest.mark.slow
@pytest.mark.distributed
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = data_args(corpus) + ["--train-iters", "12", "--save-interval", "4", "--eval-interval", "1000",
                                "--save", str(ckpt), "--load", str(ckpt), "--distributed-timeout-minutes", "1"]
    first = pretrain(2, *args, "--exit-interval", "4")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = digests(ckpt / "global_step4")

    # Rank 1's first write of global_step8 fails as on a full disk; rank 0 has nothing wrong locally.
    started = time.monotonic()
    job = Job(2, args, {SAVE_HOOK_ENV: "ENOSPC@8:1"})
    code = job.finish(timeout=120)
    elapsed = time.monotonic() - started
    assert code != 0, job.output[-3000:]
    assert elapsed < 45, elapsed  # every rank gave up at once: nobody waited for the 60 s collective timeout
    errors = {line for line in job.output.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, job.output[-4000:]  # every rank that reports says the same
    error = errors.pop()
    for part in (f"could not save checkpoint global_step8 to {ckpt}:", "[Errno 28] No space left on device",
                 "rank 1", "free space, check permissions, or point --save at another directory",
                 "the previous checkpoint global_step4 is intact"):
        assert part in error, error
    assert 'pretrain.py", line' not in job.output, job.output[-4000:]  # no rank died with a traceback
    assert (ckpt / "latest").read_text() == "global_step4"
    assert not (ckpt / "global_step8").exists()  # the half-written folder is gone, never taken for complete
    assert digests(ckpt / "global_step4") == before

    # The same command, with the disk fixed, resumes from global_step4 and finishes.
    last = pretrain(2, *args)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert f"resumed {ckpt}/global_step4 at iteration 4" in last.stdout
    assert (ckpt / "latest").read_text() == "global_step12"


@pytest.mark.slow
def test_unwritable_save_dir_fails_before_training(corpus, tmp_path):
    """Caught by the configuration check (config.validate.output_dir_problem) before any process group."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    save = blocker / "ckpt"
    started = time.monotonic()
    p = subprocess.run(command(2, data_args(corpus) + ["--train-iters", "4", "--save", str(save)]),
                       capture_output=True, text=True, env=env(), cwd=REPO, timeout=120)
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]
    errors = {line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error:")}
    assert errors == {f"error: --save {save} cannot be created: {blocker} is a file, not a folder; choose a "
                      f"writable folder"}, p.stderr[-2000:]
    assert 'pretrain.py", line' not in p.stderr  # no traceback
    assert "iteration" not in p.stdout  # refused before the first step
    assert time.monotonic() - started < 60
