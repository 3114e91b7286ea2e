"""Soak: 2,000 tiny steps on 2 ranks with evaluation and checkpoint saves; no rank's memory creeps up.

Each rank's resident set size (``memory/rank R rss MB``, read from /proc/self/statm at every log
interval) is compared with its value right after warm-up. Warm-up ends with the first
evaluation + save cycle (iteration EVERY): by then every code path of the loop (training step,
evaluation, checkpoint write and pruning, TensorBoard) has run once and allocated its buffers.
A leak of 10 kB per step would show as 20 MB (~5%) by the end.
"""
import math

import pytest

from pretrain_run import pretrain, scalars  # tests/training, on pytest.ini's pythonpath

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ITERS, EVERY, LOG = 2000, 250, 50
MAX_GROWTH = 0.05


def test_two_thousand_steps_with_eval_and_saves_keep_memory_flat(corpus, tmp_path, capsys):
    ckpt, tb = tmp_path / "ckpt", str(tmp_path / "tb")
    p = pretrain(
        2,
        "--data-path", corpus["data_path"], "--tokenizer-name-or-path", corpus["tokenizer"],
        # 1 block, h32, seq 32, one sample per rank per step: ~25 ms per step on 2 loaded cores.
        "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--lr", "1e-3", "--min-lr", "1e-4", "--train-iters", str(ITERS),
        "--log-interval", str(LOG), "--eval-interval", str(EVERY), "--eval-iters", "2",
        "--save", str(ckpt), "--save-interval", str(EVERY), "--keep-last-k", "2", "--tensorboard-dir", tb,
        timeout=420,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    # The run did what a soak should exercise: every step, every evaluation, every save (pruned to 2).
    loss = scalars(tb, "lm-loss-training/lm loss")
    assert sorted(loss) == list(range(1, ITERS + 1)) and all(math.isfinite(v) for v in loss.values())
    assert sorted(scalars(tb, "lm-loss-validation/validation/lm loss validation")) == list(range(EVERY, ITERS + 1, EVERY))
    assert p.stdout.count("> saved checkpoint") == ITERS // EVERY
    assert sorted(d.name for d in ckpt.glob("global_step*")) == [f"global_step{ITERS - EVERY}", f"global_step{ITERS}"]

    report = []
    for rank in range(2):
        rss = scalars(tb, f"memory/rank {rank} rss MB")
        assert sorted(rss) == list(range(LOG, ITERS + 1, LOG)), sorted(rss)
        after = [rss[it] for it in sorted(rss) if it > EVERY]  # first sample: iteration EVERY + LOG
        baseline, last, peak = after[0], after[-1], max(after)
        growth, peak_growth = last / baseline - 1, peak / baseline - 1
        report.append(f"rank {rank}: rss {rss[LOG]:.1f} MB at {LOG}, {baseline:.1f} MB after warm-up "
                      f"({EVERY + LOG}), {last:.1f} MB at {ITERS} ({growth:+.2%}), peak {peak:.1f} MB "
                      f"({peak_growth:+.2%})")
        assert growth < MAX_GROWTH and peak_growth < MAX_GROWTH, report[-1]
    with capsys.disabled():
        print("\nsoak " + "; ".join(report))
