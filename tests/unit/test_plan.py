"""launch/plan.py and megatron_bloom.planning: published counts, BLOOM-176B's layout, refusals, and the
memory model against the bytes a live engine holds."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_bloom.distributed import free_port
from megatron_bloom.models.bloom.sizes import count_parameters, named_model_config
from megatron_bloom.planning import Cluster, Layout, accelerator, estimate, search, stages, total_parameters
from test_bloom_sizes import RELEASED as PUBLISHED_COUNTS  # the released checkpoints' parameter counts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAN = os.path.join(REPO, "launch", "plan.py")


def _plan_module():
    spec = importlib.util.spec_from_file_location("plan_cli", PLAN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_plan(capsys, *argv):
    """launch/plan.py main() in this process: (exit code, stdout, stderr)."""
    try:
        code = _plan_module().main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


BLOOM_176B = ["--model-name", "bloom-176b", "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "12",
              "--micro-batch-size", "2", "--global-batch-size", "2048", "--rampup-batch-size", "192", "16", "9765625",
              "--seq-length", "2048", "--bf16", "--zero-stage", "0", "--checkpoint-activations"]
"""BLOOM-176B's layout, in the trainer's flags (slurm/bloom-176b.slurm)."""


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name, capsys):
    cfg = named_model_config(name)
    assert total_parameters(cfg) == PUBLISHED_COUNTS[name]
    assert count_parameters(cfg) == PUBLISHED_COUNTS[name]  # the model itself, built on the meta device
    code, out, _ = run_plan(capsys, "--model-name", name, "--nodes", "48", "--gpus-per-node", "8", "--json")
    assert last_json(out)["parameters"] == PUBLISHED_COUNTS[name]
    assert f"{PUBLISHED_COUNTS[name]:,}" in out


def test_bloom_176b_layout_fits_and_is_among_the_feasible(capsys):
    code, out, err = run_plan(capsys, "--nodes", "48", "--gpus-per-node", "8", "--gpu", "a100-80g", "--json",
                              *BLOOM_176B)
    assert code == 0, err
    plan = last_json(out)
    assert plan["feasible"] and plan["layout"]["data_parallel_size"] == 8
    assert plan["bubble"] == pytest.approx(11 / 128)  # (PP-1)/m with m = 2048 / (2 x 8)
    assert [s["micro_batches_in_flight"] for s in plan["stages"]] == list(range(12, 0, -1))  # 1F1B
    assert 30 < plan["memory_bytes"]["total"] / 2**30 < 72  # stage 0: ~44 GiB of 80
    assert 100 < plan["tflops_per_gpu"] < 200  # BLOOM logged ~150 TFLOPs per A100
    for word in ("tensor_parallel", "pipeline", "data_parallel", "MFU", "inter-node"):
        assert word in out  # the assumptions and every traffic kind are printed

    found = search(named_model_config("bloom-176b"), Cluster(48, 8, accelerator("a100-80g")), 2048)
    layouts = [(e.layout.tensor_model_parallel_size, e.layout.pipeline_model_parallel_size, e.data_parallel_size,
                e.layout.micro_batch_size, e.layout.zero_stage, e.layout.checkpoint_activations) for e in found]
    assert (4, 12, 8, 2, 1, True) in layouts
    steps = [e.performance.step_seconds for e in found]
    assert steps == sorted(steps)
    assert all(e.feasible for e in found)


def test_search_cli_lists_layouts(capsys):
    code, out, _ = run_plan(capsys, "--model-name", "bloom-176b", "--nodes", "48", "--gpus-per-node", "8", "--bf16",
                            "--global-batch-size", "2048", "--tensor-model-parallel-size", "4",
                            "--pipeline-model-parallel-size", "12", "--checkpoint-activations", "--search", "--json")
    assert code == 0
    assert "feasible layouts:" in out
    assert any(s["micro_batch_size"] == 2 and s["zero_stage"] == 1 for s in last_json(out)["search"])


def test_yaml_config_and_its_recompute(capsys):
    """configs/bloom-176b.yaml recomputes activations, as tr11 did; without recompute stage 0 cannot fit."""
    yaml_path = os.path.join(REPO, "configs", "bloom-176b.yaml")
    code, out, err = run_plan(capsys, "--config", yaml_path, "--nodes", "48", "--gpus-per-node", "8",
                              "--no-checkpoint-activations")
    assert code == 2
    assert "does not fit" in err and "--checkpoint-activations" in err and "Traceback" not in err
    code, out, err = run_plan(capsys, "--config", yaml_path, "--nodes", "48", "--gpus-per-node", "8", "--json")
    assert code == 0, err
    assert last_json(out)["layout"]["tensor_model_parallel_size"] == 4  # from the YAML


def test_paths_of_the_cluster_need_not_exist_here(capsys, tmp_path):
    """Data, tokenizer, checkpoints and logs are the cluster's: the trainer would check them there."""
    missing = tmp_path / "not-here"
    code, out, err = run_plan(capsys, "--nodes", "48", "--gpus-per-node", "8", *BLOOM_176B,
                              "--train-samples", "220000000", "--data-path", "0.5", str(missing / "en"), "0.5",
                              str(missing / "fr"), "--tokenizer-name-or-path", str(missing / "tokenizer"),
                              "--save", str(missing / "ckpt"), "--load", str(missing / "ckpt"),
                              "--tensorboard-dir", "/proc/not-writable/tb", "--kill-switch-path", str(missing / "kill"))
    assert code == 0, err
    assert "verdict        fits" in out and not missing.exists()
    code, out, err = run_plan(capsys, "--nodes", "48", "--gpus-per-node", "8", "--config", str(missing / "run.yaml"))
    assert code == 2 and "does not exist" in err  # what the plan reads must exist


def test_plan_and_trainer_flags_interleave(capsys):
    """plan.py's flags may sit anywhere among the trainer's, also between a list flag's values."""
    code, out, err = run_plan(capsys, "--model-name", "bloom-176b", "--data-path", "0.5", "en", "--json", "0.5", "fr",
                              "--nodes", "48", "--tensor-model-parallel-size", "4", "--gpus-per-node", "8",
                              *BLOOM_176B[4:], "--gpu", "a100-80g")
    assert code == 0, err
    layout = last_json(out)["layout"]
    assert (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]) == (4, 12)


def test_published_and_finetune(capsys, tmp_path):
    """--published fills what the flags leave unset; --finetune plans packed samples, and reads --pretrained's
    architecture only when nothing else names it."""
    code, out, err = run_plan(capsys, "--published", "bloom-176b", "--json")
    assert code == 0, err
    plan = last_json(out)
    assert (plan["world_size"], plan["layout"]["pipeline_model_parallel_size"], plan["layout"]["precision"]) == (
        384, 12, "bf16")
    code, out, err = run_plan(capsys, "--published", "bloom-176b", "--tensor-model-parallel-size", "8", "--fp16",
                              "--json")
    assert code == 0, err
    layout = last_json(out)["layout"]
    assert (layout["tensor_model_parallel_size"], layout["data_parallel_size"], layout["precision"]) == (8, 4, "fp16")

    bloomz = ["--nodes", "8", "--gpus-per-node", "8", "--finetune", "--pretrained", str(tmp_path / "bloom-7b1"),
              "--fp16", "--micro-batch-size", "4", "--global-batch-size", "2048", "--checkpoint-activations",
              "--train-samples", "2048000"]
    code, out, err = run_plan(capsys, *bloomz, "--model-name", "bloom-7b1")
    assert code == 0, err
    assert " packed" in out
    code, out, err = run_plan(capsys, *bloomz)
    assert code == 2 and "unless --model-name names it" in err


TP, PP = "--tensor-model-parallel-size", "--pipeline-model-parallel-size"


@pytest.mark.parametrize("argv, message", [
    ([TP, "3"], "num_attention_heads=112 is not divisible by tensor_model_parallel_size=3"),
    ([TP, "4", PP, "5"], "world size 384 is not divisible by"),
    ([TP, "4", PP, "12", "--global-batch-size", "100"], "global_batch_size=100 is not divisible"),
    ([TP, "1", PP, "1", "--checkpoint-activations"], "does not fit: stage 0 needs"),
    ([TP, "4", PP, "12", "--zero-stage", "2"], "use zero_stage 0 or 1"),
    ([TP, "4", PP, "12", "--gpu", "v100-32g", "--bf16"], "no bf16 support"),
    (["--gpu", "b200"], "unknown --gpu 'b200'"),
    # The trainer's own checks of the whole command, schedule included.
    ([TP, "4", PP, "12", "--train-iters", "10", "--train-samples", "100"], "give exactly one of train_iters"),
    ([TP, "4", PP, "12", "--global-batch-size", "2048", "--rampup-batch-size", "192", "16", "100", "--train-iters",
      "10"], "rampup_batch_size needs train_samples"),
    ([TP, "4", PP, "12", "--lr-decay-style", "step"], "lr_decay_style='step' is not one of"),
    ([TP, "4", PP, "12", "--reset-attention-mask"], "--reset-attention-mask (no attention across EOD) is not built"),
    ([TP, "4", "--tensr-model-parallel-size", "4"], "did you mean '--tensor-model-parallel-size'"),
    # plan.py's names before it took the trainer's flags point to the trainer's.
    (["--tp", "4"], "instead of --tp give --tensor-model-parallel-size"),
    (["--model", "bloom-176b"], "instead of --model give --model-name NAME or --config FILE"),
])
def test_invalid_or_oversized_layouts_fail_with_one_line(argv, message, capsys):
    code, out, err = run_plan(capsys, "--model-name", "bloom-176b", "--bf16", "--nodes", "48", "--gpus-per-node", "8",
                              *argv)
    assert code == 2
    assert message in err and err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err


def test_stage_cut_at_bloom_176b():
    """The stages' blocks; tests/parallel/test_pipeline_partition.py checks the cut against DeepSpeed."""
    assert [s.blocks for s in stages(named_model_config("bloom-176b"), 4, 12)] == [5] + [6] * 10 + [5]


def test_bloomz_176b_plans_embedding_only_stages(capsys):
    """BLOOMZ-176B's layout: 70 blocks on 72 stages, the first and last holding only an embedding."""
    code, out, err = run_plan(capsys, "--model-name", "bloom-176b", "--nodes", "36", "--gpus-per-node", "8", TP, "1",
                              PP, "72", "--micro-batch-size", "1", "--global-batch-size", "2048", "--bf16",
                              "--zero-stage", "0", "--checkpoint-activations")
    assert code == 0, err
    plan = stages(named_model_config("bloom-176b"), 1, 72, half_precision=True)
    assert [s.blocks for s in plan] == [0] + [1] * 70 + [0]
    assert plan[0].has_embedding and plan[-1].has_embedding and not plan[1].has_embedding
    assert plan[0].parameters == 250_880 * 14336 + 2 * 14336  # the embedding and its LayerNorm
    assert plan[-1].parameters == 250_880 * 14336  # the tied LM head
    assert plan[70].parameters == plan[1].parameters + 2 * 14336  # a block and the final LayerNorm


def test_more_stages_than_the_method_fills_is_one_error_line(capsys):
    code, out, err = run_plan(capsys, "--model-name", "bloom-176b", "--nodes", "73", "--gpus-per-node", "8", TP, "1",
                              PP, "73", "--micro-batch-size", "1", "--global-batch-size", "2336", "--bf16",
                              "--zero-stage", "0")
    assert code == 2 and err.startswith("error:") and "Traceback" not in err
    assert "'type:transformer|embedding' fills at most 72 stages with num_layers=70" in err


def test_loss_and_alibi_terms_at_bloom_sizes():
    """The sizes quoted in planning/memory.py's docstring, by hand."""
    from megatron_bloom.planning.memory import alibi_bias_bytes, loss_bytes

    # BLOOM-176B, TP=4: 112 / 4 = 28 heads, s = 2048, bf16: one bias for every micro-batch (235 MB).
    assert alibi_bias_bytes(named_model_config("bloom-176b"), 2048, 2, 4, "bf16") == 28 * 2048**2 * 2
    # BLOOMZ-7b1 packed micro-batches of 4, TP=1, fp16: 4 x 32 heads x 2048^2 x 2 = 1 GiB.
    bloom_7b1 = named_model_config("bloom-7b1")
    assert alibi_bias_bytes(bloom_7b1, 2048, 4, 1, "fp16", packed_samples=True) == 2**30
    # Its logits and their gradient in fp16: 2 x 2 x 4 x 2048 x 250,880 (no float32 copy).
    assert loss_bytes(bloom_7b1, 2048, 4, 1, "fp16") == 2 * 2 * 4 * 2048 * 250_880


def test_stage_memory_counts_one_bias_per_stage_not_per_block():
    """The bias is shared by a stage's blocks: its term does not grow with them. Unpacked, one for
    every micro-batch; packed, one per micro-batch in flight, or one when the blocks are recomputed."""
    from megatron_bloom.planning.memory import alibi_bias_bytes, block_activation_bytes, stage_memory
    from megatron_bloom.planning.stages import Stage

    cfg = named_model_config("bloom-7b1")
    s, b, m, tp, pp = 2048, 4, 8, 1, 4

    def acts(blocks, recompute, packed):
        stage = Stage(index=1, blocks=blocks, has_embedding=False, is_first=False, is_last=False, parameters=0)
        mem = stage_memory(stage, cfg, seq_length=s, micro_batch_size=b, micro_batches=m, tp=tp, pp=pp, dp=1,
                           zero_stage=1, precision="bf16", recompute=recompute, reduce_bucket_size=5e8,
                           packed_samples=packed)
        return mem.activations, mem.micro_batches_in_flight

    full = block_activation_bytes(cfg, s, b, tp, "bf16")
    bias = alibi_bias_bytes(cfg, s, b, tp, "bf16")
    packed_bias = alibi_bias_bytes(cfg, s, b, tp, "bf16", packed_samples=True)
    for recompute in (False, True):
        for packed in (False, True):
            (one, in_flight), (two, _) = acts(1, recompute, packed), acts(2, recompute, packed)
            assert in_flight == 3
            fixed = 2 * one - two  # what does not scale with the blocks
            want = (1 if recompute or not packed else in_flight) * (packed_bias if packed else bias)
            assert fixed == pytest.approx(want + (full if recompute else 0), rel=1e-12), (recompute, packed)
    assert acts(0, False, True)[0] == 0  # no block, no attention, no bias


def test_published_layouts_fit_their_clusters():
    from megatron_bloom.planning import PUBLISHED

    for name, pub in PUBLISHED.items():
        e = estimate(named_model_config(pub.model_name), Cluster(pub.nodes, pub.gpus_per_node, accelerator(pub.gpu)),
                     Layout(pub.tensor_model_parallel_size, pub.pipeline_model_parallel_size, pub.micro_batch_size,
                            pub.global_batch_size, pub.zero_stage, pub.checkpoint_activations, pub.precision,
                            packed_samples=pub.finetune))
        assert e.feasible, (name, e.problems)


def test_published_table_is_the_recipes():
    """--published NAME plans what slurm/NAME.slurm runs: the table and the recipe's defaults agree."""
    import re

    from megatron_bloom.planning import PUBLISHED

    for name, pub in PUBLISHED.items():
        text = open(os.path.join(REPO, "slurm", f"{name}.slurm"), encoding="utf-8").read()
        recipe = dict(re.findall(r'^: "\$\{(\w+):=([^}]*)\}"', text, re.MULTILINE))
        recipe["NODES"] = re.search(r"^#SBATCH --nodes=(\d+)", text, re.MULTILINE).group(1)
        table = {"MODEL_NAME": pub.model_name, "NODES": str(pub.nodes), "GPUS_PER_NODE": str(pub.gpus_per_node),
                 "GPU_KIND": pub.gpu, "TP": str(pub.tensor_model_parallel_size),
                 "PP": str(pub.pipeline_model_parallel_size), "ZERO_STAGE": str(pub.zero_stage),
                 "MICRO_BATCH_SIZE": str(pub.micro_batch_size), "GLOBAL_BATCH_SIZE": str(pub.global_batch_size),
                 "RAMPUP_BATCH_SIZE": " ".join(map(str, pub.rampup_batch_size or ())), "PRECISION": pub.precision,
                 "CHECKPOINT_ACTIVATIONS": str(int(pub.checkpoint_activations))}
        differ = {k: (v, recipe.get(k)) for k, v in table.items() if recipe.get(k) != v}
        assert not differ, f"planning/published.py {name} (table, recipe): {differ}"
        assert ("\nENTRY=launch/finetune.py\n" in text) == pub.finetune, name


# ---- the memory model against live engines ---------------------------------------------------------

# SDPA with dropout runs torch's math fallback on CPU (it keeps the probabilities, upcast to fp32 in
# bf16), which no GPU kernel does; the SDPA rows therefore run without dropout, and one eager row with
# BLOOM's dropout checks the mask terms (masks in the input dtype on CPU).
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
MEASURED_LAYOUTS = [
    # (processes, flags): the BLOOM path (bf16 + ZeRO-1 -> BF16_Optimizer) at PP=2 and at TP=2 x PP=2 with
    # recompute, fp16 ZeRO-1 (BLOOMZ) at DP=2, fp32 ZeRO-2 at DP=2, and fp32 ZeRO-0 in one process.
    (2, ["--bf16", "--zero-stage", "1", PP, "2", *NO_DROPOUT]),
    (4, ["--bf16", "--zero-stage", "1", TP, "2", PP, "2", "--checkpoint-activations", *NO_DROPOUT]),
    (2, ["--fp16", "--zero-stage", "1", *NO_DROPOUT]),
    (2, ["--zero-stage", "2", *NO_DROPOUT]),  # fp32: neither --bf16 nor --fp16
    (1, ["--zero-stage", "0", *NO_DROPOUT]),
    (1, ["--zero-stage", "0", "--attention-impl", "eager", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]),
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc, flags", MEASURED_LAYOUTS,
                         ids=["bf16-z1-pp2", "bf16-z1-tp2-pp2-recompute", "fp16-z1-dp2", "fp32-z2-dp2", "fp32-z0",
                              "fp32-z0-eager-dropout"])
def test_memory_model_matches_the_engine(nproc, flags):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    argv = ["--model-name", "small", "--seq-length", "64", "--gpu", "cpu", "--micro-batch-size", "2", "--nodes", "1",
            "--gpus-per-node", str(nproc), *flags, "--measure", "--json"]
    cmd = [sys.executable, PLAN, *argv] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), PLAN, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    measured = last_json(p.stdout)["measured"]
    assert len(measured["ranks"]) == nproc
    for row in measured["ranks"]:
        assert row["parameters_measured"] == row["parameters_predicted"]
        for kind in ("weights", "gradients", "optimizer_states", "buffers", "all_states"):
            predicted, got = row[kind]["predicted"], row[kind]["measured"]
            if predicted == 0:
                assert got == 0, (row["rank"], kind)
            else:
                assert abs(got / predicted - 1) <= 0.10, (row["rank"], kind, predicted, got)
    acts = measured["block_activations"]
    # Korthikanti's formula counts Megatron's eager attention; our SDPA block saves a little less
    # (0.84-0.95 on these shapes). 25% catches a model that stopped matching, not the formula's age.
    assert 0.75 <= acts["measured"] / acts["predicted"] <= 1.1, acts
    if "eager" in flags:
        # Eager attention is the formula's own: it must hold to the byte but for a few small tensors.
        assert abs(acts["measured"] / acts["predicted"] - 1) < 0.01, acts
