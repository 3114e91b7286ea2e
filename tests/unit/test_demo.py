"""launch/demo.py (`make demo`): every stage runs and is announced, failures name their stage.

The end-to-end case runs the real demo with short training (40 pretraining and 20 finetuning
iterations, 600 pairs): too short to promise that finetuning helps, so it checks the stages, the
transformers export, the before/after table and the TensorBoard logs, not the accuracy gain. The
full-size demo's gain (0% -> ~75% held-out exact match) is what `make demo` itself checks.
"""
import os
import subprocess
import sys

import pytest

from megatron_bloom.commands import demo as demo_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "launch", "demo.py")


def run_demo(*args, timeout=420):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, DEMO, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_progress_line_reads_the_trainers_console_format():
    from megatron_bloom.monitoring.console import format_training_line, format_validation_block
    from megatron_bloom.monitoring.metrics import IntervalSummary

    demo = demo_command
    interval = IntervalSummary(iterations=20, advanced_iterations=20, skipped_iterations=0, nan_iterations=0,
                               mean_loss=2.3456, seconds=3.04, samples=320, tokens=20480, flops=0.0)
    line = format_training_line(120, 400, 1920, 122880, 3e-3, 16, interval, 0.01, grad_norm=0.5)
    assert demo.progress_line("pretrain", line) == (
        "pretrain [#########.....................]  120/400 |    152 ms/it | lm loss 2.346")
    block = format_validation_block(200, {"heldout": 1.8})
    shown = [demo.progress_line("finetune", x) for x in block.splitlines()]
    assert shown[0] is None and shown[2] is None  # the box's rules
    assert shown[1].startswith("finetune validation at 200: heldout lm loss value: 1.800000E+00 | lm loss PPL: 6.0")
    assert demo.progress_line("pretrain", "[rank0] some DeepSpeed chatter\n") is None


def test_a_failing_command_names_its_stage(capsys):
    demo = demo_command
    runner = demo.Demo(fail_stage=None)
    with pytest.raises(SystemExit) as exc:
        with runner.stage("pretrain", "pretrain"):
            runner.run([sys.executable, "-c", "print('the last words'); raise SystemExit(3)"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "the last words" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("demo failed in stage 'pretrain' after ") and last.endswith("exited with code 3")


def test_out_that_cannot_be_created_is_one_line_before_any_stage(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    p = run_demo("--out", str(blocker / "demo"), timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: cannot create --out {blocker / 'demo'} (Not a directory); pass a folder you can write to"]
    assert "===" not in p.stdout


def test_foreign_out_folder_is_left_alone(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    p = run_demo("--out", str(tmp_path), timeout=120)
    assert p.returncode == 2 and "was not made by the demo" in p.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.distributed
def test_short_demo_runs_every_stage_and_reports_an_injected_failure(tmp_path):
    out = tmp_path / "demo"
    p = run_demo("--out", str(out), "--pretrain-iters", "40", "--finetune-iters", "20", "--num-train", "600",
                 "--num-heldout", "30", "--no-check")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    stdout = p.stdout
    stages = demo_command.STAGES
    for n in range(1, len(stages) + 1):
        assert f"=== [{n}/{len(stages)}] " in stdout
    # Progress bars from both training runs, ending at their last iteration.
    assert "pretrain [##############################]   40/40" in stdout
    assert "finetune [##############################]   20/20" in stdout
    # The before/after table: a header and one row per shown held-out prompt (2 per task).
    assert "| expected" in stdout and "| before finetuning" in stdout and "| after finetuning" in stdout
    table = [line for line in stdout.splitlines() if line.rstrip().endswith(("| yes", "| no"))]
    assert len(table) == 6, stdout[-3000:]
    assert "held-out exact match over 30 prompts:" in stdout
    # The end: where the logs are and how to view them.
    tb = out / "tensorboard"
    assert "view them with:" in stdout and f"--logdir {tb}" in stdout
    for run in ("pretrain", "finetune"):
        assert f"{run}: {tb / run}" in stdout
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb / run))

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf-export"))
    assert type(model).__name__ == "BloomForCausalLM" and model.config.n_layer == 2
    assert transformers.AutoTokenizer.from_pretrained(str(out / "hf-export")).vocab_size == 512

    # Same --out again (the demo cleans its own folders), failing on purpose after the data stage.
    p = run_demo("--out", str(out), "--fail-stage", "tokenizer", "--num-train", "600", "--num-heldout", "30")
    assert p.returncode == 1
    assert "=== [2/7] " in p.stdout and "=== [3/7] " not in p.stdout
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("demo failed in stage 'tokenizer' after ") and last.endswith(": failure injected with --fail-stage")
    assert not (out / "hf-export").exists()
