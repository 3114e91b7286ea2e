"""launch/pretrain.py end to end on real preprocessed data: resume, layout change, stops, monitoring."""
import math
import os
import signal
import time

import pytest
import yaml

from pretrain_run import pretrain, scalars, start

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LOSS = "lm-loss-training/lm loss"


def data_args(corpus):
    return ["--data-path", corpus["data_path"], "--tokenizer-name-or-path", corpus["tokenizer"]]


def layout(tp, pp):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """(1,2,2): 8 iterations straight, and 4 + resume 4 with the same command."""
    root = tmp_path_factory.mktemp("runs")
    straight, split = root / "straight", root / "split"
    common = data_args(corpus) + layout(1, 2)
    p = pretrain(4, *common, "--train-iters", "8", "--tensorboard-dir", str(straight / "tb"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    resume_args = common + ["--save", str(split / "ckpt"), "--load", str(split / "ckpt"),
                            "--tensorboard-dir", str(split / "tb"), "--train-iters", "8"]
    first = pretrain(4, *resume_args, "--exit-interval", "4")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "no checkpoint there yet; starting from scratch" in first.stdout + first.stderr
    second = pretrain(4, *resume_args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed" in second.stdout
    return {"straight": straight, "split": split, "first": first, "second": second}


def test_loss_falls_and_tensorboard_tags(runs):
    tb = str(runs["straight"] / "tb")
    loss = scalars(tb, LOSS)
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 0.05  # 8 steps from scratch: the falling start of the curve
    for tag in ("learning-rate/learning-rate", "grad-norm/grad-norm", "batch-size/batch-size",
                "iteration-time/iteration-time", "iteration-time/samples per second",
                "iteration-time/tokens per second", "iteration-time/TFLOPs per gpu (estimated)",
                "lm-loss-training/lm loss vs samples", "lm-loss-training/lm loss vs tokens",
                "lm-loss-validation/validation/lm loss validation",
                "lm-loss-validation/validation/lm loss validation ppl"):
        assert scalars(tb, tag), f"missing TensorBoard tag {tag}"
    assert set(scalars(tb, "lm-loss-training/lm loss vs samples")) == {8 * i for i in range(1, 9)}


def test_resume_is_bitwise(runs):
    straight = scalars(str(runs["straight"] / "tb"), LOSS)
    split = scalars(str(runs["split"] / "tb"), LOSS)
    assert split == straight  # every one of the 8 iterations, as float32 bits


def test_checkpoint_files_and_resolved_config(runs):
    ckpt = runs["split"] / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step8"
    assert (ckpt / "global_step4" / "complete").exists() and (ckpt / "global_step8" / "complete").exists()
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert cfg["parallel"]["pipeline_model_parallel_size"] == 2 and cfg["parallel"]["data_parallel_size"] == 2


def test_resume_at_another_layout(runs, corpus, tmp_path):
    """The (1,2,2) checkpoint at iteration 4 continues at (2,1,1) like the unchanged run."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs["split"] / "ckpt", ckpt)
    (ckpt / "latest").write_text("global_step4")
    shutil.rmtree(ckpt / "global_step8")
    p = pretrain(2, *data_args(corpus), *layout(2, 1), "--load", str(ckpt), "--train-iters", "8",
                 "--tensorboard-dir", str(tmp_path / "tb"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "layout changed" in p.stdout
    straight = scalars(str(runs["straight"] / "tb"), LOSS)
    resumed = scalars(str(tmp_path / "tb"), LOSS)
    assert sorted(resumed) == [5, 6, 7, 8]
    for it, value in resumed.items():
        # Same tolerance and reason as the engine parity tests: only summation order differs.
        assert math.isclose(value, straight[it], rel_tol=2e-5), (it, value, straight[it])


def _wait_for_line(proc, needle, timeout):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return line, lines
    raise AssertionError(f"'{needle}' not seen:\n" + "".join(lines[-40:]))


@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), (1, signal.SIGUSR1), (4, signal.SIGTERM)])
def test_signal_saves_within_one_step_and_exits_for_requeue(corpus, tmp_path, nproc, sig):
    ckpt = tmp_path / "ckpt"
    args = data_args(corpus) + (layout(1, 2) if nproc == 4 else []) + [
        "--train-iters", "10000", "--save", str(ckpt), "--load", str(ckpt), "--eval-interval", "100000"]
    proc = start(nproc, *args)
    try:
        line, _ = _wait_for_line(proc, "iteration        3/", timeout=240)
        proc.send_signal(sig)  # torchrun forwards SIGTERM to every rank
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = [l for l in out.splitlines() if "stopping at iteration" in l]
    assert stopped, out[-3000:]
    iteration = int(stopped[0].split("stopping at iteration ")[1].split(":")[0])
    assert 3 <= iteration <= 5  # the step in flight finishes, then it stops
    assert "exit code 3" in stopped[0]
    if nproc == 1:
        assert proc.returncode == 3
    assert (ckpt / "latest").read_text() == f"global_step{iteration}"
    assert (ckpt / f"global_step{iteration}" / "complete").exists()


def test_kill_switch_exit_interval_and_skip_ranges(corpus, tmp_path):
    ckpt, tb, switch = tmp_path / "ckpt", tmp_path / "tb", tmp_path / "STOP"
    p = pretrain(1, *data_args(corpus), "--train-iters", "12", "--save", str(ckpt), "--load", str(ckpt),
                 "--skip-train-iteration-range", "3-4", "--exit-interval", "6", "--tensorboard-dir", str(tb),
                 "--kill-switch-path", str(switch))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "stopping at iteration 6: --exit-interval 6" in p.stdout
    assert sorted(scalars(str(tb), LOSS)) == [1, 2, 5, 6]  # 3 and 4 skipped (their data too)
    import torch

    state = torch.load(ckpt / "global_step6" / "megatron_bloom.pt", weights_only=True)
    assert state["skipped_sample_ranges"] == {"3-4": [16, 32]}  # absolute sample indices
    assert state["consumed_samples"] == 48

    switch.write_text("")
    p = pretrain(1, *data_args(corpus), "--train-iters", "12", "--load", str(ckpt), "--kill-switch-path", str(switch))
    assert p.returncode == 2 and "kill switch" in p.stderr and "Traceback" not in p.stderr


def test_batch_size_rampup_same_curve_at_dp1_and_dp2(corpus, tmp_path):
    """--rampup-batch-size changes the accumulation steps of the live engine; DP=2 must follow DP=1,
    with or without steps read ahead (--num-workers)."""
    ramp = ["--rampup-batch-size", "4", "4", "24", "--train-samples", "64", "--eval-interval", "1000",
            "--lr-warmup-iters", "0", "--lr-warmup-samples", "8"]
    curves = {}
    for nproc in (1, 2):
        tb = tmp_path / f"tb{nproc}"
        # DP=1 reads each step when it starts; DP=2 reads two steps ahead across the ramp's changes.
        workers = "0" if nproc == 1 else "2"
        p = pretrain(nproc, *data_args(corpus), *ramp, "--num-workers", workers, "--tensorboard-dir", str(tb))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        curves[nproc] = (scalars(str(tb), LOSS), scalars(str(tb), "batch-size/batch-size"))
    losses1, batches1 = curves[1]
    losses2, batches2 = curves[2]
    assert [batches1[i] for i in sorted(batches1)] == [4] * 6 + [8] * 5  # 4 until 24 samples, then 8
    assert batches2 == batches1 and sorted(losses2) == sorted(losses1)
    for it in losses1:
        assert math.isclose(losses1[it], losses2[it], rel_tol=2e-5), (it, losses1[it], losses2[it])


def test_three_stages_train_and_evaluate(corpus, tmp_path):
    """A middle pipeline stage reads no data but must run the same train and eval schedules."""
    p = pretrain(3, *data_args(corpus), *layout(1, 3), "--train-iters", "3", "--eval-interval", "1",
                 "--tensorboard-dir", str(tmp_path / "tb"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(scalars(str(tmp_path / "tb"), "lm-loss-validation/validation/lm loss validation")) == [1, 2, 3]


def test_finished_run_started_again_rewrites_nothing(runs, corpus, tmp_path):
    """The same command after the run finished: nothing to train, and the final checkpoint (the one a
    kill mid-rewrite would corrupt) is left exactly as it was."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs["split"] / "ckpt", ckpt)
    # config.yaml records each invocation's resolved settings; everything else must stay untouched.
    def files():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(ckpt.rglob("*"))
                if p.is_file() and p.name != "config.yaml"}

    before = files()
    p = pretrain(4, *data_args(corpus), *layout(1, 2), "--save", str(ckpt), "--load", str(ckpt), "--train-iters", "8")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed" in p.stdout and "training done at iteration 8" in p.stdout
    assert "saved checkpoint" not in p.stdout
    assert files() == before
