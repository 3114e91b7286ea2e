"""benchmarks/gpu_smoke.py (`make gpu-smoke`) without running its steps: no GPU means one error line
and exit 2, a failing step is named, and what it reads from the logs and the profiler is read right.

The end-to-end CPU rehearsal is tests/training/test_gpu_smoke.py."""
import os
import subprocess
import sys

import numpy as np

from benchmarks import gpu_smoke
from megatron_bloom.monitoring.console import format_memory_line, format_training_line
from megatron_bloom.monitoring.metrics import IntervalSummary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_smoke.py")


def run_smoke(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def test_without_a_gpu_it_exits_2_with_one_error_line():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    p = run_smoke(env={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: gpu-smoke needs an NVIDIA GPU: torch.cuda.is_available() is False here")
    assert lines[0].endswith("(use --device cpu for a CPU rehearsal)")
    assert "===" not in p.stdout  # no step started


def test_a_failing_step_is_named_in_the_last_line_and_its_files_kept(tmp_path):
    work = tmp_path / "work"
    p = run_smoke("--device", "cpu", "--work-dir", str(work), "--fail-step", "data")
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu-smoke failed at step 'data' after ")
    assert "failure injected with --fail-step" in last and str(work) in last
    assert "=== [1/8] data:" in p.stdout and "=== [2/8]" not in p.stdout
    assert (work / "logs").is_dir()


def test_a_failing_command_shows_its_last_output_then_the_step(tmp_path, capsys):
    smoke = gpu_smoke.Smoke("cpu", str(tmp_path), fail_step=None)
    os.makedirs(tmp_path / "logs")
    try:
        with smoke.step("pretrain", "pretrain"):
            smoke.run([sys.executable, "-c", "print('the last words'); raise SystemExit(3)"], "pretrain")
    except SystemExit as exc:
        assert exc.code == 1
    else:
        raise AssertionError("a failing command did not end the smoke run")
    err = capsys.readouterr().err.strip().splitlines()
    assert "the last words" in err
    assert err[-1].startswith("gpu-smoke failed at step 'pretrain' after ")
    assert "exited with code 3" in err[-1] and str(tmp_path / "logs" / "pretrain.log") in err[-1]


def test_training_log_lines_are_read_in_the_trainers_format():
    lines = []
    for it, tps in ((1, 100.0), (2, 2000.0), (3, 3000.0), (4, 4000.0)):
        interval = IntervalSummary(iterations=1, advanced_iterations=1, skipped_iterations=0, nan_iterations=0,
                                   mean_loss=7.0 - it, seconds=1.0, samples=8, tokens=int(tps), flops=0.0)
        lines.append(format_training_line(it, 4, 8 * it, 512 * it, 1e-3, 8, interval, 0.01, grad_norm=0.5))
    lines.append(format_memory_line(2, {"max rss MB": [100.0]}))
    lines.append(format_memory_line(4, {"max rss MB": [812.5], "max allocated MB": [301.2],
                                        "max reserved MB": [512.0]}))
    out = "\n".join(["[rank0] chatter"] + lines)
    assert gpu_smoke.iteration_lines(out) == lines[:4]
    assert gpu_smoke.tokens_per_second(out) == 3000.0  # median after the first (warm-up) interval
    assert [gpu_smoke.log_field(x, "lm loss") for x in lines[:4]] == [6.0, 5.0, 4.0, 3.0]
    assert gpu_smoke.peak_memory(out) == {"max rss MB": 812.5, "max allocated MB": 301.2, "max reserved MB": 512.0}
    facts = gpu_smoke.TrainFacts("bf16", [6.0, 3.0], 3000.0, gpu_smoke.peak_memory(out))
    assert facts.memory_text() == "max allocated 301 MB, max reserved 512 MB (max rss 812 MB)"
    # A log without the GPU fields (CPU, or a trainer that does not log them yet) says so.
    rss_only = gpu_smoke.TrainFacts("fp32", [6.0], None, gpu_smoke.peak_memory(lines[4]))
    assert rss_only.memory_text() == "max allocated n/a, max reserved n/a (max rss 100 MB)"
    assert rss_only.tokens_text() == "n/a"


def test_resume_comparison_is_bitwise():
    straight = {1: 7.0, 2: 6.5, 3: 6.25, 4: 6.0}
    assert gpu_smoke.compare_curves(straight, {3: 6.25, 4: 6.0}, [3, 4]) is None
    next_float32 = float(np.nextafter(np.float32(6.0), np.float32(7.0)))  # one float32 ulp above 6.0
    assert "from step 4 on (after 1 resumed update(s))" in gpu_smoke.compare_curves(
        straight, {3: 6.25, 4: next_float32}, [3, 4])
    assert "from step 3 on (the first resumed step)" in gpu_smoke.compare_curves(
        straight, {3: 6.5, 4: 6.0}, [3, 4])
    assert "expected [3, 4]" in gpu_smoke.compare_curves(straight, {4: 6.0}, [3, 4])
    assert "expected [3, 4]" in gpu_smoke.compare_curves(straight, {2: 6.5, 3: 6.25, 4: 6.0}, [3, 4])


def test_sdpa_kind_from_op_and_kernel_names():
    kind = gpu_smoke.sdpa_kind
    assert kind(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_efficient_attention",
                 "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)"]
                ) == "memory-efficient"
    assert kind(["aten::_scaled_dot_product_flash_attention",
                 "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>"]) == "flash"
    # cuDNN's kernels carry "flash" in their names: still cuDNN.
    assert kind(["aten::_scaled_dot_product_cudnn_attention",
                 "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64"]) == "cuDNN"
    assert kind(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == "flash (CPU)"
    assert kind(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math",
                 "aten::bmm"]) == "math"
    assert kind(["aten::baddbmm", "aten::softmax"]) is None


def test_sdpa_kind_of_what_this_torch_runs_on_cpu():
    """The names the classifier reads are the ones this torch's profiler reports."""
    import torch
    import torch.nn.functional as F

    class Attention(torch.nn.Module):
        def forward(self, q):  # q [b, np, s, hn], with a float bias as ALiBi's
            bias = torch.zeros(1, q.shape[1], q.shape[2], q.shape[2])
            return F.scaled_dot_product_attention(q, q, q, attn_mask=bias, dropout_p=0.1 if self.training else 0.0)

    model, q = Attention(), torch.randn(2, 4, 16, 8)
    with torch.random.fork_rng():
        trained, names = gpu_smoke.profile_attention(model.train(), q, "cpu")
    assert trained == "math" and "aten::_scaled_dot_product_attention_math" in names
    inferred, names = gpu_smoke.profile_attention(model.eval(), q, "cpu")
    assert inferred == "flash (CPU)" and names == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
