"""Launch launch/pretrain.py the way users do (torchrun, or plain python for one process)."""
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_bloom.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "1000",
    "--seq-length", "32", "--init-method-std", "0.02", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
    "--clip-grad", "1.0", "--split", "90,10,0", "--log-interval", "1", "--eval-interval", "4",
    "--eval-iters", "1", "--zero-stage", "1", "--seed", "7",
    # Runs at different layouts are compared step for step; each layout draws other dropout masks.
    "--hidden-dropout", "0", "--attention-dropout", "0",
]


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def command(nproc, args):
    script = os.path.join(REPO, "launch", "pretrain.py")
    if nproc == 1:
        return [sys.executable, script, *TINY, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *TINY, *args]


def pretrain(nproc, *args, timeout=300):
    return subprocess.run(command(nproc, list(args)), capture_output=True, text=True, env=env(), timeout=timeout,
                          cwd=REPO)


def start(nproc, *args):
    return subprocess.Popen(command(nproc, list(args)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), cwd=REPO)


def scalars(tb_dir, tag):
    """{step: value} of a TensorBoard tag over every event file in tb_dir (a resumed run adds one)."""
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}
