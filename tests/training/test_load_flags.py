"""--no-load-optim, --no-load-rng, --finetune and --reset-progress, as Megatron-DeepSpeed's
load_checkpoint applies them, and a run's own checkpoints resumed in full (one process, ~2 min)."""
import re
import shutil

import pytest

from pretrain_run import pretrain, scalars

pytestmark = pytest.mark.slow

LOSS = "lm-loss-training/lm loss"


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """4 steps saved at 4, then the full resume to 8 (the reference for what the flags change)."""
    root = tmp_path_factory.mktemp("loadflags")
    common = ["--data-path", corpus["data_path"], "--tokenizer-name-or-path", corpus["tokenizer"],
              "--train-iters", "8", "--save-interval", "4"]
    ok(pretrain(1, *common, "--save", str(root / "ckpt"), "--exit-interval", "4"))
    shutil.copytree(root / "ckpt", root / "full")
    ok(pretrain(1, *common, "--save", str(root / "full"), "--load", str(root / "full"),
                "--tensorboard-dir", str(root / "full-tb")))
    return root, common


def run_from(base, name, *flags, tb=True):
    root, common = base
    shutil.copytree(root / "ckpt", root / name)
    extra = ["--tensorboard-dir", str(root / f"{name}-tb")] if tb else []
    return ok(pretrain(1, *common, "--save", str(root / name), "--load", str(root / name), *extra, *flags))


def test_no_load_optim_keeps_progress_and_weights_but_not_adam_state(base):
    root, _ = base
    out = run_from(base, "noopt", "--no-load-optim")
    assert "not its optimizer state (--no-load-optim/--finetune)" in out
    assert "training from iteration 4 (32 samples consumed)" in out
    full, noopt = scalars(str(root / "full-tb"), LOSS), scalars(str(root / "noopt-tb"), LOSS)
    assert sorted(noopt) == [5, 6, 7, 8]
    assert noopt[5] == full[5]  # the same weights (step 5's loss is computed before its update)
    assert noopt[6] != full[6]  # a fresh Adam moves them otherwise


def test_reset_progress_starts_at_zero_and_a_requeue_of_the_same_command_resumes_its_own_checkpoint(base):
    root, _ = base
    out = run_from(base, "reset", "--reset-progress", "--exit-interval", "2")
    assert "starting at iteration 0 with 0 samples consumed (--reset-progress)" in out
    assert "training from iteration 0 (0 samples consumed)" in out
    assert (root / "reset" / "latest").read_text().strip() == "global_step2"
    # The same command again (a requeued job): its own checkpoint, saved by a run given the flag.
    _, common = base
    out = ok(pretrain(1, *common, "--save", str(root / "reset"), "--load", str(root / "reset"), "--reset-progress"))
    assert "was saved by a run given --reset-progress: resuming it in full" in out
    assert "training from iteration 2 (16 samples consumed)" in out
    assert (root / "reset" / "latest").read_text().strip() == "global_step8"


def test_finetune_starts_at_iteration_zero_keeping_consumed_samples(base):
    out = run_from(base, "ft", "--finetune", "--exit-interval", "1", tb=False)
    assert "not its optimizer state" in out
    assert "starting at iteration 0 with 32 samples consumed (--finetune)" in out


def test_no_load_rng_draws_fresh_streams(base):
    out = run_from(base, "norng", "--no-load-rng", "--exit-interval", "5", tb=False)
    assert re.search(r"resumed .* at iteration 4, 32 samples", out)
    assert "--no-load-rng: RNG streams drawn fresh from --seed" in out
