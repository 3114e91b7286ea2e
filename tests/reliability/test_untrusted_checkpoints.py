"""A checkpoint from anywhere never runs code: every file kind, every entry point that reads one.

Each case plants a pickle whose unpickling would create a marker file (``os.system("touch ...")``)
in one kind of file of a real checkpoint, runs the command a user would type, and checks that it
exits 2 with one ``error:`` line naming that file and ``posix.system``, before any engine was built,
and that the marker does not exist. The planted pickle comes in both shapes: inside a ``torch.save``
zip (what a tampered checkpoint looks like) and as a bare pickle replacing the whole file.

The pre-flight check (``checkpoint/trust.py``) is the first wall; the second, every ``torch.load``
of the process forced weights-only (DeepSpeed's included), is tested on its own at the end, with
the pre-flight check out of the way.
"""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_bad_inputs import MODEL, REPO, TRAIN, assert_refused, env, pretrain_args, run

pytestmark = pytest.mark.slow


class Payload:
    """Unpickled in full, this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant(path: Path, marker: Path, bare: bool = False) -> None:
    """Replace ``path`` with a file holding the payload where its data would be."""
    if bare:  # the whole file one pickle, as the reproduction wrote it
        path.write_bytes(pickle.dumps({"optimizer_state_dict": Payload(marker)}))
    else:  # a torch.save zip whose dict has the payload as a value
        torch.save({"optimizer_state_dict": {"state": Payload(marker)}, "module": Payload(marker),
                    "param": Payload(marker)}, path)


def assert_payload_refused(r, path: Path, marker: Path) -> None:
    assert_refused(r, f"{path} holds posix.system")
    assert not marker.exists(), "the payload ran"


def train(p, out: Path, *extra) -> Path:
    r = run("launch/pretrain.py", *pretrain_args(p, "--save", out, "--save-interval", "1", *extra))
    assert r.proc.returncode == 0, r.proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ckpts(p, tmp_path_factory):
    """Training checkpoints (ZeRO-1 fp32: zero_pp_rank files; bf16: bf16_zero_pp_rank files), a
    weights-only native checkpoint and a transformers folder with a pytorch_model.bin."""
    d = tmp_path_factory.mktemp("untrusted")
    fp32 = train(p, d / "fp32")
    bf16 = train(p, d / "bf16", "--bf16")
    hf = d / "hf"
    r = run("launch/convert_checkpoint.py", "native-to-hf", "--load", p["d"] / "ckpt_tp2", "--out", hf,
            "--tokenizer", p["tok"])
    assert r.proc.returncode == 0, r.proc.stderr[-3000:]
    # A pytorch_model.bin folder, as older transformers and torch.save-based tools write it.
    from safetensors.torch import load_file

    torch.save(load_file(str(hf / "model.safetensors")), hf / "pytorch_model.bin")
    os.remove(hf / "model.safetensors")
    return {"fp32": fp32, "bf16": bf16, "native": p["d"] / "ckpt_tp2", "hf": hf}


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_the_checkpoints_hold_every_kind_of_file(ckpts):
    names = {f.name for f in (ckpts["fp32"] / "global_step1").rglob("*.pt")}
    assert {"layer_01-model_00-model_states.pt", "mp_rank_00_model_states.pt", "megatron_bloom.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank_00000.pt"} <= names, names
    assert (ckpts["bf16"] / "global_step1" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()


# ---- --load ------------------------------------------------------------------------------------------------

LOAD_CASES = {
    # id: (checkpoint, file inside global_step1, bare pickle)
    "layer-file": ("fp32", "layer_03-model_00-model_states.pt", False),
    "engine-file": ("fp32", "mp_rank_00_model_states.pt", False),
    "zero-optimizer": ("fp32", "zero_pp_rank_0_mp_rank_00_optim_states.pt", False),
    "zero-optimizer-bare-pickle": ("fp32", "zero_pp_rank_0_mp_rank_00_optim_states.pt", True),
    "bf16-optimizer": ("bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", False),
    "trainer-state": ("fp32", "megatron_bloom.pt", False),
    "rng-file": ("fp32", "rng/rank_00000.pt", True),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_refuses_a_planted_pickle(p, ckpts, case, tmp_path):
    kind, name, bare = LOAD_CASES[case]
    ckpt = copy(ckpts[kind], tmp_path)
    target, marker = ckpt / "global_step1" / name, tmp_path / "pwned"
    plant(target, marker, bare)
    extra = ["--bf16"] if kind == "bf16" else []
    r = run("launch/pretrain.py", *pretrain_args(p, "--load", ckpt, "--train-iters", "2", *extra))
    assert_payload_refused(r, target, marker)


def test_load_refuses_a_planted_pickle_in_a_universal_checkpoint(p, ckpts, tmp_path):
    """The universal checkpoint a layout change converted to is loaded as it is found next time."""
    ckpt = copy(ckpts["fp32"], tmp_path)
    universal = ckpt / "universal" / "global_step1" / "zero" / "3.input_layernorm.weight"
    universal.mkdir(parents=True)
    target, marker = universal / "fp32.pt", tmp_path / "pwned"
    plant(target, marker)
    r = run("launch/pretrain.py", *pretrain_args(p, "--load", ckpt, "--train-iters", "2"))
    assert_payload_refused(r, target, marker)


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_load_refuses_a_broken_optimizer_file_in_one_line(p, ckpts, damage, tmp_path):
    ckpt = copy(ckpts["fp32"], tmp_path)
    target = ckpt / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:1000])
        expected = f"{target} is corrupt or truncated"
    else:  # a readable tensor file of something else (a model's weights)
        torch.save({"weight": torch.zeros(2)}, target)
        expected = f"{target} is not a DeepSpeed optimizer state ('optimizer_state_dict'): it holds weight"
    r = run("launch/pretrain.py", *pretrain_args(p, "--load", ckpt, "--train-iters", "2"))
    assert_refused(r, expected)
    assert "KeyError" not in r.proc.stderr


# ---- --pretrained, converters, evaluation and generation -----------------------------------------------------


def planted_native(ckpts, tmp_path):
    ckpt = copy(ckpts["native"], tmp_path)
    target = ckpt / "global_step0" / "layer_03-model_01-model_states.pt"
    plant(target, tmp_path / "pwned")
    return ckpt, target


def planted_hf(ckpts, tmp_path):
    hf = copy(ckpts["hf"], tmp_path)
    target = hf / "pytorch_model.bin"
    plant(target, tmp_path / "pwned")
    return hf, target


def planted_megatron_deepspeed(ckpts, tmp_path):
    """Megatron-DeepSpeed's layout (ours is it): its engine file tampered with."""
    ckpt = copy(ckpts["fp32"], tmp_path)
    target = ckpt / "global_step1" / "mp_rank_00_model_states.pt"
    plant(target, tmp_path / "pwned")
    return ckpt, target


SOURCES = {"native": planted_native, "hf": planted_hf}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_finetune_pretrained_refuses_a_planted_pickle(p, ckpts, source, tmp_path):
    folder, target = SOURCES[source](ckpts, tmp_path)
    r = run("launch/finetune.py", *MODEL, *TRAIN, "--vocab-size", p["vocab"], "--data-path", p["xp3"],
            "--pretrained", folder, "--save", tmp_path / "ft")
    assert_payload_refused(r, target, tmp_path / "pwned")
    assert not (tmp_path / "ft").exists()


CONVERTERS = {
    "native-to-hf": (planted_native, ["--out", "OUT"]),
    "hf-to-native": (planted_hf, ["--out", "OUT", "--tp", "1"]),
    "megatron-deepspeed-to-hf": (planted_megatron_deepspeed, ["--out", "OUT"]),
    "megatron-deepspeed-to-native": (planted_megatron_deepspeed, ["--out", "OUT", "--tp", "1"]),
}


@pytest.mark.parametrize("command", sorted(CONVERTERS))
def test_converters_refuse_a_planted_pickle(ckpts, command, tmp_path):
    make, rest = CONVERTERS[command]
    folder, target = make(ckpts, tmp_path)
    out = tmp_path / "out"
    flag = "--hf" if command == "hf-to-native" else "--load"
    r = run("launch/convert_checkpoint.py", command, flag, folder, *[str(out) if a == "OUT" else a for a in rest])
    assert_payload_refused(r, target, tmp_path / "pwned")
    assert not out.exists()


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("tool", ["evaluate", "generate"])
def test_evaluate_and_generate_refuse_a_planted_pickle(p, ckpts, source, tool, tmp_path):
    folder, target = SOURCES[source](ckpts, tmp_path)
    if tool == "evaluate":
        r = run("launch/evaluate.py", "--load", folder, "--data", p["jsonl"], "--tokenizer", p["tok"])
    else:
        r = run("launch/generate.py", "--load", folder, "--prompt", "Hello", "--tokenizer", p["tok"])
    assert_payload_refused(r, target, tmp_path / "pwned")


def test_deepspeeds_converter_refuses_a_planted_pickle(ckpts, tmp_path):
    """ds_to_universal, as resume at another layout runs it (and as users may)."""
    ckpt = copy(ckpts["fp32"], tmp_path)
    target = ckpt / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(target, tmp_path / "pwned", bare=True)
    proc = subprocess.run([sys.executable, "-m", "megatron_bloom.checkpoint.run_with_megatron_enums", "-m",
                           "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / "global_step1"),
                           "--output_folder", str(tmp_path / "universal")],
                          capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines[-1].startswith(f"error: {target} holds posix.system"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "pwned").exists()


# ---- the second wall: DeepSpeed's own loads, with the pre-flight check out of the way --------------------------


TOOL = """
import sys, torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
try:
    TorchCheckpointEngine().load(sys.argv[1], map_location="cpu")   # weights_only=False inside
except Exception as exc:
    print("refused:", type(exc).__name__)
try:
    torch.load(sys.argv[1], weights_only=False)
except Exception as exc:
    print("refused:", type(exc).__name__)
"""


@pytest.mark.parametrize("bare", [False, True], ids=["zip", "bare-pickle"])
def test_deepspeeds_own_loads_are_weights_only_under_our_tools(tmp_path, bare):
    target, marker = tmp_path / "optim_states.bin", tmp_path / "pwned"
    plant(target, marker, bare)
    (tmp_path / "tool.py").write_text(TOOL)
    proc = subprocess.run([sys.executable, "-m", "megatron_bloom.checkpoint.run_with_megatron_enums",
                           str(tmp_path / "tool.py"), str(target)],
                          capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("refused: UnpicklingError") == 2, proc.stdout + proc.stderr[-3000:]
    assert not marker.exists()


def test_the_entry_points_force_weights_only_in_process_and_in_children(tmp_path):
    """cli.entry_point: every torch.load of a command, and of the processes it starts."""
    from megatron_bloom.cli import entry_point

    target, marker = tmp_path / "file.pt", tmp_path / "pwned"
    plant(target, marker)
    seen = {}

    def command():
        try:
            torch.load(target, weights_only=False)
        except pickle.UnpicklingError:
            seen["in process"] = "refused"
        child = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(target)!r}, weights_only=False)"],
                               capture_output=True, text=True, timeout=120)
        seen["child"] = "refused" if "UnpicklingError" in child.stderr else child.stderr[-500:]
        return 0

    with pytest.raises(SystemExit) as code:
        entry_point(command)()
    assert code.value.code == 0
    assert seen == {"in process": "refused", "child": "refused"} and not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the command
