"""SIGKILL of the whole job at any moment, then the same command: the final weights are bitwise those of
a run that was never interrupted."""
import shutil

import pytest
import torch

from megatron_bloom.checkpoint.manager import SAVE_HOOK_ENV
from pretrain_run import pretrain
from reliability_job import Job, checkpoint_tensors, data_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ITERS, INTERVAL = 24, 4


def latest(ckpt):
    return (ckpt / "latest").read_text()


def test_killed_job_resumes_to_the_weights_of_an_uninterrupted_run(corpus, tmp_path):
    ref, ckpt = tmp_path / "ref", tmp_path / "ckpt"
    common = data_args(corpus) + ["--train-iters", str(ITERS), "--save-interval", str(INTERVAL),
                                  "--eval-interval", "1000", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                                  # TP=2: the attention masks come from each rank's tracked stream, which
                                  # the checkpoint must carry for the resume to be bitwise.
                                  "--tensor-model-parallel-size", "2"]
    straight = pretrain(2, *common, "--save", str(ref), "--load", str(ref))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    args = common + ["--save", str(ckpt), "--load", str(ckpt)]

    # 1. Between two saves: iteration 6 is lost, the run goes back to 4.
    job = Job(2, args)
    job.wait_for("iteration        6/")
    job.kill()
    assert latest(ckpt) == "global_step4"

    # 2. Inside the save of iteration 12: every rank's files are written, 'complete' is not.
    job = Job(2, args, {SAVE_HOOK_ENV: f"hold@12"})
    job.wait_for(f"resumed {ckpt}/global_step4 at iteration 4")
    job.wait_for("test hook: holding global_step12 before its 'complete' marker")
    job.kill()
    assert latest(ckpt) == "global_step8"
    assert (ckpt / "global_step12" / "megatron_bloom.pt").exists()
    assert not (ckpt / "global_step12" / "complete").exists()
    # The same leftover at an iteration no later save repeats (a signal's save killed at 10), and
    # a folder that is not one of our saves (a Megatron-DeepSpeed checkpoint in the same --save).
    shutil.copytree(ckpt / "global_step12", ckpt / "global_step10")
    foreign = ckpt / "global_step2"
    foreign.mkdir()
    (foreign / "mp_rank_00_model_states.pt").write_bytes(b"not ours")

    # 3. Right after the save of iteration 16 ('latest' moved): nothing is lost.
    job = Job(2, args)
    job.wait_for(f"resumed {ckpt}/global_step8 at iteration 8")
    job.wait_for(f"> saved checkpoint {ckpt}/global_step16")
    job.kill()
    assert latest(ckpt) == "global_step16"
    assert not (ckpt / "global_step10").exists(), "a completed save left an unfinished one behind"
    assert (foreign / "mp_rank_00_model_states.pt").read_bytes() == b"not ours"

    last = pretrain(2, *args)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert f"resumed {ckpt}/global_step16 at iteration 16" in last.stdout
    assert latest(ckpt) == latest(ref) == f"global_step{ITERS}"
    for it in range(INTERVAL, ITERS + 1, INTERVAL):
        assert (ckpt / f"global_step{it}" / "complete").exists()

    want = checkpoint_tensors(ref / f"global_step{ITERS}")
    got = checkpoint_tensors(ckpt / f"global_step{ITERS}")
    assert sorted(got) == sorted(want)
    # Weights per layer, fp32 master weights and Adam moments per ZeRO shard, every rank's RNG.
    assert sum(k.startswith("layer_") for k in want) >= 6 and any("optim_states" in k for k in want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different
