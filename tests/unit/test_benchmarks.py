"""The single-process benchmarks run end to end at small sizes and report what the README quotes."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_json(*argv, timeout=300):
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout, json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_model_step_reports_speed_mfu_and_plot(tmp_path):
    out, r = run_json("benchmarks/model_step.py", "--hidden-size", "64", "--num-layers", "2", "--num-attention-heads",
                      "4", "--vocab-size", "512", "--seq-length", "64", "--micro-batch-size", "2", "--steps", "3",
                      "--warmup", "1", "--peak-size", "256", "--profile", "1", "--keep-denormals", "--plot",
                      str(tmp_path), "--json")
    for key in ("ours_tokens_per_s", "hf_tokens_per_s", "speedup", "ours_mfu", "hf_mfu", "matmul_peak_flops"):
        assert r[key] > 0, key
    # Megatron-DeepSpeed's formula (the training logs' TFLOPs) at this size, by hand, no recompute:
    # 24 * 3 * b s l h^2 (1 + s/6h + V/16lh).
    b, s, l, h, v = 2, 64, 2, 64, 512
    assert r["model_flops_per_step"] == pytest.approx(72 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h)))
    assert r["ours_mfu"] == pytest.approx(r["model_flops_per_step"] / r["ours_median_step_s"] / r["matmul_peak_flops"])
    assert r["ours_mfu"] < 1.0 and r["hf_mfu"] < 1.0  # the peak is a real upper bound of the step's matmuls
    assert r["run"]["torch"] and "model_step.py" in r["run"]["command"]
    assert "| megatron_bloom |" in out and "| transformers |" in out
    png = tmp_path / "model_step_fp32_h64.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["denormals_flushed"] is False  # --keep-denormals
    # --profile: ours' dense matmuls are exactly the linear layers and the LM head, forward (2 FLOPs per
    # multiply-add) and backward (twice that): 72 b s l h^2 + 6 b s h V; SDPA does the attention products.
    ours, hf = r["profile"]["ours"], r["profile"]["hf"]
    assert ours["matmul_flops"] == 72 * b * s * l * h * h + 6 * b * s * h * v
    assert hf["matmul_flops"] > ours["matmul_flops"]  # transformers also does QK^T and PV with (b)bmm
    assert ours["seconds"]["attention kernel (SDPA)"] > 0 and hf["seconds"]["attention kernel (SDPA)"] == 0
    for prof in (ours, hf):
        assert prof["seconds"]["dense matmuls"] > 0 and prof["seconds"]["optimizer"] > 0
        assert 0 < sum(prof["seconds"].values()) <= prof["wall_s"]
    assert "| dense matmuls |" in out and "of the measured peak" in out


def test_denormals_benchmark_finds_alibi_underflow(tmp_path):  # ~10 s
    # 8 heads: the first slope is 1/2, so at 256 tokens the farthest keys sit ~127 below the row's
    # maximum score, where exp gives float32 denormals; with every slope 0 (plain causal) none.
    out, r = run_json("benchmarks/denormals.py", "--micro-batch-size", "1", "--num-attention-heads", "8",
                      "--seq-length", "256", "--head-dim", "8", "--iters", "1", "--rounds", "1",
                      "--plot", str(tmp_path), "--json")
    cases = r["cases"]
    assert set(cases) == {"alibi", "causal", "alibi-flushed"}
    assert cases["alibi"]["denormal_share"] > 0 and cases["causal"]["denormal_share"] == 0
    assert cases["alibi-flushed"]["flushed"] and not cases["alibi"]["flushed"] and not cases["causal"]["flushed"]
    assert cases["alibi-flushed"]["denormal_share"] == 0  # the flush holds in the softmax too
    assert all(c["median_ms"] > 0 and len(c["per_process_ms"]) == 1 for c in cases.values())
    assert "| alibi |" in out and "denormals.py" in r["run"]["command"]
    assert r["plots"][0].endswith("denormals_sdpa.png") and os.path.getsize(r["plots"][0]) > 0


@pytest.mark.slow
def test_data_benchmarks_report_throughput(tmp_path):
    _, pre = run_json("benchmarks/preprocess.py", "--size-mb", "0.5", "--train-sample-mb", "0.2", "--workers", "1",
                      "--work-dir", str(tmp_path / "pre"), "--array-tasks", "2", "--plot", str(tmp_path / "plots"), "--json")
    run = pre["runs"][0]
    assert run["workers"] == 1 and run["tokens"] > 0 and run["tokens_per_s"] == pytest.approx(run["tokens"] / run["wall_s"])
    # The job-array path: both tasks' bytes make up the corpus, and the array's wall covers the slowest task.
    array = pre["array"]
    assert [t["task"] for t in array["per_task"]] == [0, 1]
    assert sum(t["mb"] for t in array["per_task"]) == pytest.approx(pre["corpus_mb"])
    assert array["array_wall_s"] >= max(t["wall_s"] for t in array["per_task"]) > 0
    assert array["array_mb_per_s"] == pytest.approx(pre["corpus_mb"] / array["array_wall_s"])
    assert "preprocess.py" in pre["run"]["command"] and pre["plots"][0].endswith(".png")


def test_dataset_benchmark_reports_its_run_and_plots(tmp_path):  # ~10 s
    out, ds = run_json("benchmarks/dataset.py", "--num-docs", "20000", "--epochs", "1.0", "--blend-samples", "20000",
                       "--read-docs", "1000", "--read-samples", "200", "--seq-length", "128", "--scan-gb", "0.004",
                       "--plot", str(tmp_path), "--json")
    assert ds["index"][0]["num_docs"] == 20000 and ds["index"][0]["num_samples"] > 0
    assert ds["read"]["samples"] == 200 and ds["read"]["samples_per_s"] > 0
    # The token-id scan went through start-up's path (no sidecar: 'scan') over the whole .bin and
    # found the one id planted above the random ones.
    (scan,) = ds["scan"]
    assert scan["how"] == "scan" and scan["startup_scans"] and scan["dtype"] == "int32"
    assert scan["found_id"] == scan["planted_id"] == 250_879
    assert scan["bin_bytes"] == scan["tokens"] * 4 == int(0.004 * 2**30) // 4 * 4
    assert scan["cold_s"] > 0 and len(scan["warm_runs_s"]) == 3
    assert scan["gib_per_s"] == pytest.approx(scan["bin_bytes"] / 2**30 / scan["warm_s"])
    assert "### Token-id scan" in out and "| 250,879 (250,879) |" in out
    run = ds["run"]
    assert run["torch"] and run["cores"] and "dataset.py --num-docs 20000" in run["command"]
    assert f"{run['cpu']}, {run['cores']} cores" in out.splitlines()[0]  # the run line heads the output
    assert ds["plots"] == [str(tmp_path / f"dataset_{name}.png") for name in ("index", "blend", "scan")]
    for png in ds["plots"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_check_benchmark_counts_the_files_it_wrote(tmp_path):  # ~5 s
    out, r = run_json("benchmarks/checkpoint_check.py", "--layer-files", "12", "--optim-gib", "0.002", "--repeat", "2",
                      "--plot", str(tmp_path), "--json")
    layers, optim = r["cases"]
    # 12 layer files (embedding, 10 blocks, final LayerNorm) + megatron_bloom.pt + mp_rank_00_model_states.pt.
    assert layers["name"] == "layer files" and layers["files"] == layers["files_checked"] == 14
    assert optim["name"] == "optimizer file" and optim["files"] == optim["files_checked"] == 1
    assert optim["bytes"] >= 0.002 * 2**30  # three fp32 tensors of 0.002 GiB / 12 elements, plus the pickle
    for c in (layers, optim):
        assert len(c["warm_runs_s"]) == 2 and c["first_s"] > 0
        assert c["ms_per_file"] == pytest.approx(c["warm_s"] * 1e3 / c["files_checked"])
    assert "| layer files | 14 |" in out and "| optimizer file | 1 |" in out
    assert "checkpoint_check.py --layer-files 12" in r["run"]["command"] and out.startswith(r["run"]["cpu"])
    assert r["plots"] == [str(tmp_path / "checkpoint_check.png")]
    assert open(r["plots"][0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
