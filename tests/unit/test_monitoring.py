"""TrainingMonitor: a run's worth of metrics read back from TensorBoard files and wandb's offline log."""
import glob
import json
import math
import os
import struct
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_bloom.errors import UserError
from megatron_bloom.config import RunConfig, validate_config
from megatron_bloom.monitoring import TrainingMonitor
from megatron_bloom.training.flops import flops_per_iteration, model_flops_per_iteration

WORLD = 4
GBS, SEQ, ITERS, LOG_EVERY = 8, 128, 20, 5
STEP_TIME = 0.125  # exact in binary, so every derived number below is exact too
SKIPPED = 7  # an fp16 overflow step: loss inf, optimizer step skipped


def make_cfg(tmp_path, fp16=True, wandb_project=None):
    cfg = RunConfig()
    cfg.model.seq_length = SEQ
    t = cfg.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.fp16 = 2, GBS, ITERS, fp16
    cfg.logging.log_interval = LOG_EVERY
    cfg.logging.tensorboard_dir = str(tmp_path / "tb")
    cfg.logging.wandb_project = wandb_project
    return validate_config(cfg, world_size=WORLD)  # DP 4: 2 x 4 = 8, one micro-batch per step


def monitor_for(cfg, **kwargs):
    """The monitor as the trainer builds it: the run's length and its model FLOPs handed in."""
    return TrainingMonitor(cfg, train_iters=ITERS, flops_per_iteration=model_flops_per_iteration(cfg), **kwargs)


def step_values(i):
    """What the trainer would hand over after optimizer step i (1-based)."""
    return dict(
        consumed_samples=GBS * i,
        consumed_tokens=GBS * SEQ * i,
        loss=math.inf if i == SKIPPED else 10.0 - 0.25 * i,
        learning_rate=1e-4 * i / ITERS,
        global_batch_size=GBS,
        grad_norm=None if i == SKIPPED else 1.0 + 0.1 * i,
        loss_scale=4096.0 if i < SKIPPED else 2048.0,
        skipped=i == SKIPPED,
    )


VALIDATION = {10: {"valid-en": 3.0, "valid-fr": 4.0}, 20: {"valid-en": 2.5, "valid-fr": 3.5}}
MEMORY = [100.0, 200.0, 300.0, 450.5]


def run(monitor, printed=None):
    lines = []
    for i in range(1, ITERS + 1):
        line = monitor.record_step(i, step_time=STEP_TIME, **step_values(i))
        if line:
            lines.append(line)
        if i in VALIDATION:
            monitor.log_validation(i, VALIDATION[i], GBS * i, GBS * SEQ * i)
        if i == 10:
            monitor.log_memory(i, {"max rss MB": MEMORY})
    monitor.close()
    return lines


def scalars(log_dir):
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def close(a, b):
    """Same steps, values equal to float32 precision (TensorBoard stores scalars as float32)."""
    return [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6)


def test_tensorboard_tags_values_and_steps(tmp_path):
    cfg = make_cfg(tmp_path)
    printed = []
    lines = run(monitor_for(cfg, is_logging_rank=True, world_size=WORLD, print_fn=printed.append))
    acc, tb = scalars(cfg.logging.tensorboard_dir)

    advanced = [i for i in range(1, ITERS + 1) if i != SKIPPED]
    every = list(range(1, ITERS + 1))
    loss = {i: 10.0 - 0.25 * i for i in advanced}
    # Per-iteration tags: x = iteration, samples or tokens as the name says.
    assert close(tb["lm-loss-training/lm loss"], [(i, loss[i]) for i in advanced])
    assert close(tb["lm-loss-training/lm loss vs samples"], [(GBS * i, loss[i]) for i in advanced])
    assert close(tb["lm-loss-training/lm loss vs tokens"], [(GBS * SEQ * i, loss[i]) for i in advanced])
    assert close(tb["learning-rate/learning-rate"], [(i, 1e-4 * i / ITERS) for i in every])
    assert close(tb["learning-rate/learning-rate vs samples"], [(GBS * i, 1e-4 * i / ITERS) for i in every])
    assert close(tb["grad-norm/grad-norm"], [(i, 1.0 + 0.1 * i) for i in advanced])
    assert close(tb["grad-norm/grad-norm vs samples"], [(GBS * i, 1.0 + 0.1 * i) for i in advanced])
    assert tb["loss-scale/loss-scale"] == [(i, 4096.0 if i < SKIPPED else 2048.0) for i in every]
    assert tb["batch-size/batch-size"] == [(i, GBS) for i in every]
    assert tb["batch-size/batch-size vs samples"] == [(GBS * i, GBS) for i in every]
    assert tb["steps-vs-samples/y=samples,x=steps"] == [(i, GBS * i) for i in every]
    assert tb["steps-vs-samples/y=steps,x=samples"] == [(GBS * i, i) for i in every]
    assert tb["steps-vs-tokens/y=tokens,x=steps"] == [(i, GBS * SEQ * i) for i in every]
    assert tb["steps-vs-tokens/y=steps,x=tokens"] == [(GBS * SEQ * i, i) for i in every]

    # Per-interval tags at iterations 5, 10, 15, 20.
    logged = range(LOG_EVERY, ITERS + 1, LOG_EVERY)
    per_second = GBS / STEP_TIME  # 64 samples/s
    tflops = flops_per_iteration(GBS, SEQ, cfg.model.num_layers, cfg.model.hidden_size, 256, False) / (
        STEP_TIME * WORLD * 1e12)
    assert tb["iteration-time/iteration-time"] == [(i, STEP_TIME) for i in logged]
    assert tb["iteration-time/iteration-time vs samples"] == [(GBS * i, STEP_TIME) for i in logged]
    assert tb["iteration-time/samples per second"] == [(i, per_second) for i in logged]
    assert tb["iteration-time/samples per second per replica"] == [(i, per_second / 4) for i in logged]
    assert tb["iteration-time/tokens per second"] == [(i, per_second * SEQ) for i in logged]
    assert close(tb["iteration-time/TFLOPs per gpu (estimated)"], [(i, tflops) for i in logged])
    assert tb["skipped-iterations/skipped-iterations"] == [(5, 0), (10, 1), (15, 0), (20, 0)]
    assert tb["nan-iterations/nan-iterations"] == [(5, 0), (10, 1), (15, 0), (20, 0)]

    for group in ("valid-en", "valid-fr"):
        base = f"lm-loss-validation/{group}/lm loss validation"
        want = [(it, v[group]) for it, v in VALIDATION.items()]
        assert tb[base] == want
        assert tb[base + " vs samples"] == [(GBS * it, v) for it, v in want]
        assert tb[base + " vs tokens"] == [(GBS * SEQ * it, v) for it, v in want]
        assert close(tb[base + " ppl"], [(it, math.exp(v)) for it, v in want])
        assert close(tb[base + " ppl vs samples"], [(GBS * it, math.exp(v)) for it, v in want])

    for rank, mb in enumerate(MEMORY):
        assert tb[f"memory/rank {rank} max rss MB"] == [(10, mb)]

    text = acc.Tensors("arguments/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| argument | value |" in text and "| training.train_iters | 20 |" in text
    assert "| parallel.data_parallel_size | 4 |" in text

    # Console: one line per interval, validation boxes, the memory line.
    assert lines == [p for p in printed if p.startswith(" iteration")] and len(lines) == 4
    assert any("validation loss at iteration 10 | valid-fr lm loss value: 4.000000E+00" in p for p in printed)
    assert any(p.startswith(" memory after iteration 10 | max rss MB: rank 0 100.0") for p in printed)


def test_console_line_format(tmp_path):
    cfg = make_cfg(tmp_path)
    lines = run(monitor_for(cfg, is_logging_rank=True, world_size=WORLD, print_fn=lambda _: None))
    assert lines[0] == (
        " iteration        5/      20 | consumed samples:           40 | consumed tokens:         5120 |"
        " elapsed time per iteration (ms): 125.0 | learning rate: 2.500E-05 | global batch size:     8 |"
        " lm loss: 9.250000E+00 | loss scale: 4096.0 | grad norm: 1.500 | number of skipped iterations:   0 |"
        " number of nan iterations:   0 | samples per second: 64.000 | tokens per second: 8192.0 | TFLOPs: 0.00 |"
    )
    # Interval 6..10: step 7 skipped, so the loss is the mean of steps 6, 8, 9, 10 (Megatron).
    assert " lm loss: 7.937500E+00 | loss scale: 2048.0 | grad norm: 2.000 |" in lines[1]
    assert "number of skipped iterations:   1 | number of nan iterations:   1 |" in lines[1]


def test_validation_block_format(tmp_path):
    cfg = make_cfg(tmp_path)
    monitor = monitor_for(cfg, is_logging_rank=True, world_size=WORLD, print_fn=lambda _: None)
    block = monitor.log_validation(1000, {"valid-en": 2.0, None: 30.0}, 8000, 8000 * SEQ)
    monitor.close()
    rule, en, unnamed, rule2 = block.split("\n")
    assert en == (" validation loss at iteration 1000 | valid-en lm loss value: 2.000000E+00 |"
                  " lm loss PPL: 7.389056E+00 |")
    # PPL is capped at exp(20) as in Megatron; an unnamed set has no group in its name or tag.
    assert unnamed == " validation loss at iteration 1000 | lm loss value: 3.000000E+01 | lm loss PPL: 4.851652E+08 |"
    assert rule == rule2 == "-" * (len(en) + 1)
    _, tb = scalars(cfg.logging.tensorboard_dir)
    assert tb["lm-loss-validation/lm loss validation"] == [(1000, 30.0)]


def test_bf16_run_has_no_loss_scale_and_other_ranks_write_nothing(tmp_path):
    cfg = make_cfg(tmp_path, fp16=False)
    lines = run(monitor_for(cfg, is_logging_rank=True, world_size=WORLD, print_fn=lambda _: None))
    assert all("loss scale" not in line for line in lines)
    _, tb = scalars(cfg.logging.tensorboard_dir)
    assert not any(tag.startswith("loss-scale/") for tag in tb)

    other = make_cfg(tmp_path / "other")
    printed = []
    assert run(monitor_for(other, is_logging_rank=False, world_size=WORLD, print_fn=printed.append)) == []
    assert printed == [] and not os.path.exists(other.logging.tensorboard_dir)


def test_wall_clock_interval_leaves_out_untimed_work(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    cfg = make_cfg(tmp_path)
    monitor = monitor_for(cfg, is_logging_rank=True, world_size=WORLD, print_fn=lambda _: None)
    clock[0] = 500.0  # setup time before the loop is not counted
    monitor.reset_timer()
    for i in range(1, 6):
        clock[0] += 0.5
        if i == 3:
            with monitor.untimed():  # e.g. a checkpoint save
                clock[0] += 60.0
        line = monitor.record_step(i, **step_values(i))
    monitor.close()
    assert "elapsed time per iteration (ms): 500.0 |" in line and "samples per second: 16.000 |" in line


def test_log_scalars_for_later_features(tmp_path):
    cfg = make_cfg(tmp_path)
    monitor = monitor_for(cfg, is_logging_rank=True, world_size=WORLD, print_fn=lambda _: None)
    monitor.log_scalars("lm-loss-training/per-language", {"fr lm loss": 2.5, "en lm loss": 2.25}, 3, 24, 3072)
    monitor.log_scalars("custom", {"x": 1.0}, 4)
    monitor.close()
    _, tb = scalars(cfg.logging.tensorboard_dir)
    assert tb["lm-loss-training/per-language/fr lm loss"] == [(3, 2.5)]
    assert tb["lm-loss-training/per-language/en lm loss vs samples"] == [(24, 2.25)]
    assert tb["lm-loss-training/per-language/en lm loss vs tokens"] == [(3072, 2.25)]
    assert tb["custom/x"] == [(4, 1.0)] and "custom/x vs samples" not in tb


def test_wandb_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(UserError) as err:
        monitor_for(make_cfg(tmp_path, wandb_project="p"), is_logging_rank=True, world_size=WORLD)
    assert "wandb is not installed" in str(err.value) and "\n" not in str(err.value)


def read_wandb_log(path):
    """Records of a .wandb file: LevelDB-log framing (7-byte header, 32 KiB blocks, chunks of
    crc32 + length + type) around wandb's protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a chunk header: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            records.append(payload)
        elif kind == 2:  # first
            pending = payload
        elif kind == 3:  # middle
            pending += payload
        elif kind == 4:  # last
            records.append(pending + payload)
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def test_wandb_offline_run_writes_the_same_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'megatron_bloom[wandb]'")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    cfg = make_cfg(tmp_path, wandb_project="megatron-bloom-test")
    run(monitor_for(cfg, is_logging_rank=True, world_size=WORLD, print_fn=lambda _: None))

    files = glob.glob(os.path.join(cfg.logging.tensorboard_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    # wandb's service process may still be appending after finish() returns on a loaded machine:
    # re-read (bounded) until the last step is there.
    deadline = time.monotonic() + 60
    while True:
        history = {}
        records = read_wandb_log(files[0])
        for rec in records:
            if rec.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
                history.setdefault(rec.history.step.num, {}).update(items)
        if ITERS in history or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(history) == list(range(1, ITERS + 1))
    assert history[5]["lm-loss-training/lm loss"] == 10.0 - 0.25 * 5
    assert history[5]["lm-loss-training/lm loss vs samples"] == 10.0 - 0.25 * 5
    assert history[5]["steps-vs-samples/y=samples,x=steps"] == 40
    assert history[5]["iteration-time/samples per second"] == GBS / STEP_TIME
    assert "lm-loss-training/lm loss" not in history[SKIPPED]
    assert history[10]["lm-loss-validation/valid-fr/lm loss validation"] == 4.0
    assert history[10]["memory/rank 3 max rss MB"] == 450.5
    assert history[20]["loss-scale/loss-scale"] == 2048.0
    metrics = {rec.metric.name: rec.metric.step_metric for rec in records if rec.WhichOneof("record_type") == "metric"}
    assert metrics["lm-loss-training/lm loss vs samples"] == "steps-vs-samples/y=samples,x=steps"
    assert metrics["lm-loss-training/lm loss vs tokens"] == "steps-vs-tokens/y=tokens,x=steps"
    assert metrics["steps-vs-samples/y=steps,x=samples"] == "steps-vs-samples/y=samples,x=steps"
    # The resolved config travels with the run record (wandb.init(config=...)).
    configs = [rec.run.config for rec in records if rec.WhichOneof("record_type") == "run"]
    training = [json.loads(u.value_json) for c in configs for u in c.update if u.key == "training"]
    assert training and training[-1]["train_iters"] == ITERS
