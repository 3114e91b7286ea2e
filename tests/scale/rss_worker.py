"""launch/pretrain.py run in this process, with this rank's resident memory written to a JSON file.

    torchrun --nproc-per-node 4 tests/scale/rss_worker.py OUT_DIR PRETRAIN_FLAGS...

Writes ``OUT_DIR/rank<R>.json`` with, in bytes:

- ``baseline``: resident set once torch, DeepSpeed and the trainer are imported, before any
  process group, dataset or model exists (the peak is reset to it first);
- ``before_model``: the resident set when the trainer starts building its engine (process
  groups, tokenizer and dataset exist by then);
- ``peak_before_save``: the largest resident set from then until the first checkpoint save starts
  (model build, the training steps, evaluation): what the planner's memory model describes;
- ``peak``: the largest over the whole run, the save included (DeepSpeed clones each layer's
  tensors before ``torch.save``, which the planner does not count);
- ``after_step``: the resident set right after the last optimizer step, when the rank holds its
  weights and Adam states and no gradients (the engine frees them at the step);
- ``instructions``: the largest resident set during each kind of DeepSpeed pipeline instruction
  (ForwardPass, BackwardPass, ReduceTiedGrads, OptimizerStep, ...), to say where a peak comes from.

Linux only: it reads /proc/self/statm and resets the peak through /proc/self/clear_refs (so the
trainer's own "max rss" log line shows the peak since the latest reset, not since start-up).
"""
import json
import os
import resource
import runpy
import sys

import deepspeed  # noqa: F401  (imported before the baseline, as the trainer imports it)
import torch  # noqa: F401

import megatron_bloom.cli  # noqa: F401
import megatron_bloom.training.pretrain  # noqa: F401
from megatron_bloom.training.engine import BloomEngine
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resident() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    # ru_maxrss is in KiB on Linux; clear_refs "5" below resets it (and VmHWM) to the current RSS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def main() -> None:
    out_dir, argv = sys.argv[1], sys.argv[2:]
    reset_peak()
    figures = {"baseline": resident(), "instructions": {}}
    highest = [0]  # the peak over the resets made around each pipeline instruction

    def run_peak() -> int:
        return max(highest[0], peak())

    save = DeepSpeedEngine.save_checkpoint

    def save_and_record(self, *args, **kwargs):
        figures.setdefault("peak_before_save", run_peak())
        return save(self, *args, **kwargs)

    DeepSpeedEngine.save_checkpoint = save_and_record
    build = BloomEngine.__init__

    def build_and_record(self, *args, **kwargs):
        figures.setdefault("before_model", resident())
        return build(self, *args, **kwargs)

    BloomEngine.__init__ = build_and_record
    table = PipelineEngine._INSTRUCTION_MAP

    def recorded(kind, run):
        def run_and_record(self, *args, **kwargs):
            highest[0] = run_peak()
            reset_peak()
            try:
                return run(self, *args, **kwargs)
            finally:
                now = peak()
                highest[0] = max(highest[0], now)
                figures["instructions"][kind.__name__] = max(figures["instructions"].get(kind.__name__, 0), now)
                if kind.__name__ == "OptimizerStep":
                    figures["after_step"] = resident()
        return run_and_record

    PipelineEngine._INSTRUCTION_MAP = {kind: recorded(kind, run) for kind, run in table.items()}
    sys.argv = [os.path.join(REPO, "launch", "pretrain.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    figures["peak"] = run_peak()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(figures, fh)


if __name__ == "__main__":
    main()
