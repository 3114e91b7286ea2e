"""slurm/ without a cluster: syntax, the 176B header, and the commands each recipe would run (DRY_RUN=1)."""
import glob
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "slurm", "*.slurm"))) + [
    os.path.join(REPO, "slurm", "launcher.sh"),
    os.path.join(REPO, "tests", "slurm", "local_cluster.sh"),
]
RECIPES = {os.path.basename(p)[: -len(".slurm")]: p for p in glob.glob(os.path.join(REPO, "slurm", "*.slurm"))}


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(path):
    p = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def sbatch_options(path):
    """#SBATCH lines as {option: value} (value True for flags)."""
    out = {}
    for line in open(path):
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return out


def test_bloom_176b_asks_for_48_nodes_of_8_gpus_at_tp4_pp12():
    path = RECIPES["bloom-176b"]
    opts = sbatch_options(path)
    assert opts["nodes"] == "48" and opts["gres"] == "gpu:8" and opts["ntasks-per-node"] == "1"
    assert opts["signal"].startswith("USR1@") and opts["requeue"] is True
    assert re.fullmatch(r"1-\d+%1", opts["array"])
    text = open(path).read()
    for var, value in (("GPUS_PER_NODE", "8"), ("TP", "4"), ("PP", "12"), ("MICRO_BATCH_SIZE", "2"),
                       ("GLOBAL_BATCH_SIZE", "2048"), ("RAMPUP_BATCH_SIZE", "192 16 9765625"), ("SEQ_LEN", "2048"),
                       ("PRECISION", "bf16"), ("ZERO_STAGE", "0"), ("SAVE_INTERVAL", "100")):
        assert f': "${{{var}:={value}}}"' in text, var


def fake_bin(tmp_path, time_limit="20:00:00"):
    """squeue reporting a time limit, so the recipe derives --exit-duration-in-mins without SLURM."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    squeue = d / "squeue"
    squeue.write_text(f"#!/bin/sh\necho {time_limit}\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    return str(d)


def dry_run(recipe, tmp_path, nodes, **env):
    e = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, REPO=REPO, SLURM_NNODES=str(nodes), SLURM_JOB_ID="4242",
             SLURM_JOB_NODELIST=f"gpu[1-{nodes}]", MASTER_ADDR="gpu1", RUN_DIR=str(tmp_path / "run"),
             PATH=fake_bin(tmp_path) + os.pathsep + os.environ["PATH"], TOKENIZER="tok", DATA_PATH="data/x",
             DS_ACCELERATOR="cpu")
    e.update(env)
    return subprocess.run(["bash", RECIPES[recipe]], capture_output=True, text=True, env=e, timeout=300, cwd=REPO)


def srun_command(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("+ srun "))
    return shlex.split(line[2:])


def preflight_command(stdout):
    """The arguments the pre-flight hands launch/plan.py (DRY_RUN=1 still runs it, and prints them quoted)."""
    prefix = "=== pre-flight: launch/plan.py "
    line = next(line for line in stdout.splitlines() if line.startswith(prefix))
    return shlex.split(line[len(prefix):])


def trainer_command(argv, entry):
    return argv[argv.index(os.path.join(REPO, "launch", entry)) + 1:]


def flag(argv, name, n=1):
    i = argv.index(name)
    return argv[i + 1] if n == 1 else argv[i + 1:i + 1 + n]


def test_bloom_176b_command(tmp_path):
    p = dry_run("bloom-176b", tmp_path, 48)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "verdict        fits" in p.stdout
    argv = srun_command(p.stdout)
    # The pre-flight plans the very command the ranks run, on the job's cluster.
    assert preflight_command(p.stdout) == ["--nodes", "48", "--gpus-per-node", "8", "--gpu", "a100-80g",
                                           *trainer_command(argv, "pretrain.py")]
    assert argv[:5] == ["srun", "--kill-on-bad-exit=1", "--wait=60", "--nodes=48", "--ntasks-per-node=1"]
    assert argv[6:8] == ["-u", os.path.join(REPO, "slurm", "torchrun_node.py")]
    torchrun = argv[argv.index("--") + 1:]
    assert flag(torchrun, "--nnodes") == "48" and flag(torchrun, "--nproc-per-node") == "8"
    assert flag(torchrun, "--rdzv-backend") == "c10d" and flag(torchrun, "--rdzv-endpoint") == "gpu1:14242"
    assert flag(torchrun, "--max-restarts") == "0"
    trainer = trainer_command(torchrun, "pretrain.py")
    expected = {"--model-name": "bloom-176b", "--tensor-model-parallel-size": "4", "--pipeline-model-parallel-size": "12",
                "--micro-batch-size": "2", "--global-batch-size": "2048", "--seq-length": "2048", "--zero-stage": "0",
                "--pp-partition-method": "type:transformer|embedding", "--save-interval": "100",
                "--exit-duration-in-mins": str(20 * 60 - 10), "--distributed-backend": "nccl",
                "--train-samples": "220000000", "--init-method-std": "0.0048"}
    for name, value in expected.items():
        assert flag(trainer, name) == value, name
    assert flag(trainer, "--rampup-batch-size", 3) == ["192", "16", "9765625"]
    assert "--bf16" in trainer and "--checkpoint-activations" in trainer
    assert flag(trainer, "--save") == flag(trainer, "--load")  # one command for the first run and every requeue


@pytest.mark.parametrize("recipe, nodes, gpus, tp, pp", [
    ("bloom-560m", 8, 4, 1, 1), ("bloom-1b1", 8, 4, 1, 2), ("bloom-1b7", 16, 4, 2, 2), ("bloom-3b", 32, 4, 4, 4),
    ("bloom-7b1", 32, 4, 4, 4), ("bloomz-7b1", 8, 8, 1, 1),
])
def test_published_recipes_pass_their_preflight(recipe, nodes, gpus, tp, pp, tmp_path):
    opts = sbatch_options(RECIPES[recipe])
    assert opts["nodes"] == str(nodes) and opts["gres"] == f"gpu:{gpus}"
    p = dry_run(recipe, tmp_path, nodes)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "verdict        fits" in p.stdout
    argv = srun_command(p.stdout)
    assert flag(argv, "--nproc-per-node") == str(gpus)
    assert flag(argv, "--tensor-model-parallel-size") == str(tp) and flag(argv, "--pipeline-model-parallel-size") == str(pp)
    entry = "finetune.py" if recipe == "bloomz-7b1" else "pretrain.py"
    assert preflight_command(p.stdout)[6:] == [*(["--finetune"] if entry == "finetune.py" else []),
                                               *trainer_command(argv, entry)]
    if recipe == "bloomz-7b1":
        assert "--pretrained" in argv and "--fp16" in argv and flag(argv, "--global-batch-size") == "2048"
        assert flag(argv, "--train-weighted-split-paths-path").endswith("xp3.mixture.txt")
    else:
        assert "--fp16" in argv and flag(argv, "--model-name") == recipe


def test_bad_layout_fails_in_preflight_before_srun(tmp_path):
    p = dry_run("bloom-176b", tmp_path, 48, TP="3", PP="1")
    assert p.returncode == 2
    assert "num_attention_heads=112 is not divisible by tensor_model_parallel_size=3" in p.stderr
    assert "pre-flight failed" in p.stderr and "+ srun" not in p.stdout


def test_kill_switch_stops_before_starting(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "kill-switch").write_text("")
    p = dry_run("bloom-176b", tmp_path, 48, SLURM_ARRAY_JOB_ID="4000")
    assert p.returncode == 0
    assert "kill switch" in p.stdout and "+ srun" not in p.stdout
    assert "+ scancel --state=PENDING 4000" in p.stdout  # the rest of the array is cancelled too


@pytest.mark.parametrize("limit, minutes", [("20:00:00", "1200"), ("1-02:03:00", "1563"), ("30:00", "30"),
                                            ("45", "45"), ("10:30", "11"), ("UNLIMITED", "")])
def test_time_limit_parsing(limit, minutes, tmp_path):
    """--exit-duration-in-mins is derived from squeue's %l in every format SLURM prints."""
    script = f'source "{REPO}/slurm/launcher.sh"; job_time_limit_minutes'
    e = dict(os.environ, PATH=fake_bin(tmp_path, limit) + os.pathsep + os.environ["PATH"], SLURM_JOB_ID="1")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=e, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == minutes
