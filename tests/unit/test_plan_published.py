"""bigscience's own BLOOM/BLOOMZ command lines (tests/recipes/published/*.args) planned as they ran.

Each file holds the trainer arguments of one published slurm script, with header lines naming the
cluster it ran on, the entry point and the DeepSpeed JSON beside it; paths are $VARIABLES. plan.py
gets the file's arguments unchanged, the cluster as --nodes/--gpus-per-node/--gpu, and must say
"fits": the published runs trained on exactly these layouts.
"""
import glob
import os
import re
import shlex
import string

import pytest

from test_plan import REPO, last_json, run_plan

PUBLISHED = os.path.join(REPO, "tests", "recipes", "published")
ARGS_FILES = sorted(glob.glob(os.path.join(PUBLISHED, "*.args")))


def published_command(path, paths_root):
    """(plan.py argv, trainer argv) of one .args file; every path but the DeepSpeed JSON lies under
    ``paths_root``, which is never created (the cluster's paths need not exist where the plan runs)."""
    header, lines = {}, []
    for line in open(path, encoding="utf-8"):
        m = re.match(r"#\s*([\w-]+):\s*(.*\S)", line)
        if m:
            header[m.group(1)] = m.group(2)
        elif line.strip() and not line.startswith("#"):
            lines.append(line.strip())
    body = " ".join(lines)
    values = {name: str(paths_root / name.lower()) for name in re.findall(r"\$(\w+)", body)}
    values["DEEPSPEED_CONFIG"] = os.path.join(PUBLISHED, header["deepspeed_config"])
    trainer = shlex.split(string.Template(body).substitute(values))
    cluster = dict(kv.split("=") for kv in header["cluster"].split())
    argv = ["--nodes", cluster["nodes"], "--gpus-per-node", cluster["gpus-per-node"], "--gpu", cluster["gpu"]]
    if header["entry"] == "finetune":
        argv.append("--finetune")
    return argv + trainer + ["--json"], trainer


def flag(argv, name):
    return int(argv[len(argv) - 1 - argv[::-1].index(name) + 1].replace("_", ""))  # the last one wins


def test_the_four_scripts_are_here():
    assert [os.path.basename(p) for p in ARGS_FILES] == [
        "tr11-176B-ml.args", "tr11b-1B3-ml.args", "tr13-176B-mtf.args", "tr13f-6b3-mtf.args"]


@pytest.mark.parametrize("path", ARGS_FILES, ids=lambda p: os.path.basename(p)[: -len(".args")])
def test_published_command_fits_the_cluster_it_ran_on(path, tmp_path, capsys):
    cluster_paths = tmp_path / "cluster"
    argv, trainer = published_command(path, cluster_paths)
    code, out, err = run_plan(capsys, *argv)
    assert code == 0, err
    assert "verdict        fits" in out
    plan = last_json(out)
    layout = plan["layout"]
    assert plan["world_size"] == flag(argv, "--nodes") * flag(argv, "--gpus-per-node")
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                 "global_batch_size", "seq_length"):
        assert layout[name] == flag(trainer, "--" + name.replace("_", "-")), name
    assert layout["precision"] == ("bf16" if "--bf16" in trainer else "fp16")
    assert layout["checkpoint_activations"] == ("--checkpoint-activations" in trainer)
    assert not cluster_paths.exists()
