"""The real `tensorboard` program serves what TrainingMonitor wrote (its HTTP API, as the browser reads it)."""
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from megatron_bloom.monitoring import TrainingMonitor

from test_monitoring import GBS, ITERS, SEQ, SKIPPED, STEP_TIME, VALIDATION, WORLD, make_cfg, run

STARTUP_SECONDS = 60  # tensorboard's first import + first directory scan take a few seconds on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


def log_tail(path):
    with open(path, errors="replace") as fh:
        return fh.read()[-2000:]


def start_tensorboard(logdir, log_path):
    """Start the server on a free port; retry with another port if it dies at once (port taken)."""
    for _ in range(3):
        port = free_port()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
                 "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        time.sleep(0.5)
        if proc.poll() is None:
            return proc, port
    pytest.fail(f"tensorboard exited at start (code {proc.returncode}):\n{log_tail(log_path)}")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.timeout(180)
def test_tensorboard_serves_the_monitor_scalars(tmp_path):
    cfg = make_cfg(tmp_path)
    run(TrainingMonitor(cfg, is_logging_rank=True, world_size=WORLD, print_fn=lambda _: None))
    log_path = str(tmp_path / "tensorboard.log")
    proc, port = start_tensorboard(cfg.logging.tensorboard_dir, log_path)
    try:
        # Wait until the server answers AND has loaded the run (it scans the log dir in the background).
        deadline, tags, last_error = time.monotonic() + STARTUP_SECONDS, {}, None
        want = "lm-loss-validation/valid-en/lm loss validation"
        while time.monotonic() < deadline and want not in tags.get(".", {}):
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited (code {proc.returncode}):\n{log_tail(log_path)}")
            try:
                tags = get_json(port, "/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                last_error = exc
            time.sleep(0.5)
        assert want in tags.get(".", {}), (
            f"no scalars served after {STARTUP_SECONDS}s ({last_error}):\n{log_tail(log_path)}")

        assert get_json(port, "/data/runs") == ["."]  # the monitor writes straight into tensorboard_dir
        for tag in ("lm-loss-training/lm loss", "lm-loss-training/lm loss vs samples", "learning-rate/learning-rate",
                    "grad-norm/grad-norm", "loss-scale/loss-scale", "batch-size/batch-size",
                    "iteration-time/iteration-time", "iteration-time/TFLOPs per gpu (estimated)",
                    "lm-loss-validation/valid-fr/lm loss validation ppl", "memory/rank 3 max rss MB"):
            assert tag in tags["."], tag

        def series(tag):
            # Each point is [wall_time, step, value].
            points = get_json(port, "/data/plugin/scalars/scalars", run=".", tag=tag)
            return [(step, value) for _, step, value in points]

        advanced = [i for i in range(1, ITERS + 1) if i != SKIPPED]
        assert series("lm-loss-training/lm loss") == [(i, 10.0 - 0.25 * i) for i in advanced]
        assert series("lm-loss-training/lm loss vs tokens") == [(GBS * SEQ * i, 10.0 - 0.25 * i) for i in advanced]
        assert series("iteration-time/samples per second") == [(i, GBS / STEP_TIME) for i in (5, 10, 15, 20)]
        ppl = series("lm-loss-validation/valid-en/lm loss validation ppl vs samples")
        assert [s for s, _ in ppl] == [GBS * it for it in VALIDATION]
        assert [v for _, v in ppl] == pytest.approx([math.exp(v["valid-en"]) for v in VALIDATION.values()], rel=1e-6)
    finally:
        stop(proc)
    assert proc.returncode is not None
