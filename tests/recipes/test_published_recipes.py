"""Our recipes equal bigscience's published ones, value by value.

tests/recipes/published/NAME.args holds the trainer arguments of one of bigscience's scripts, and
NAME.ds_config.json the DeepSpeed JSON it wrote. Both sides are resolved into a ``RunConfig`` with
``parse_config`` and compared field by field:

* published: Megatron-DeepSpeed's defaults where ours differ (``MEGATRON_DEEPSPEED_DEFAULTS``), then
  the published flags, then the DeepSpeed JSON (DeepSpeed, not the Megatron flags, owns the fp16
  loss scaler); the named architecture fills what the script does not state (vocabulary size).
* configs/*.yaml: ``parse_config(["--config", path])``.
* slurm/*.slurm: the recipe run with DRY_RUN=1 (the job's time limit from its own ``#SBATCH --time``),
  the trainer arguments of the srun line it prints parsed the same way.

Fields holding paths, and the distributed backend, are not compared (``NOT_COMPARED``). Every other
difference must be listed in ``DEVIATIONS`` with the published value, ours and the reason (the same
reason the recipe's comment gives); a listed deviation that no longer holds fails too.
"""
import dataclasses
import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from megatron_bloom.config import parse_config, validate_config
from megatron_bloom.config.loader import build_parser, explicit_keys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PUBLISHED = os.path.join(REPO, "tests", "recipes", "published")

# (published script, our recipe); the published header's "# entry:" says which launcher runs it.
RECIPES = [
    ("tr11-176B-ml", "configs/bloom-176b.yaml"),
    ("tr11-176B-ml", "slurm/bloom-176b.slurm"),
    ("tr11b-1B3-ml", "slurm/bloom-1b7.slurm"),
    ("tr13f-6b3-mtf", "configs/bloomz-7b1.yaml"),
    ("tr13f-6b3-mtf", "slurm/bloomz-7b1.slurm"),
    ("tr13-176B-mtf", "configs/bloomz-176b.yaml"),
    ("tr13-176B-mtf", "slurm/bloomz-176b.slurm"),
]

# The named architecture each script trained or finetuned (fills vocab_size and the like).
MODEL_NAME = {"tr11-176B-ml": "bloom-176b", "tr11b-1B3-ml": "bloom-1b7", "tr13f-6b3-mtf": "bloom-7b1",
              "tr13-176B-mtf": "bloom-176b"}

# Megatron-DeepSpeed's argparse defaults (megatron/arguments.py) where ours differ, so that a flag a
# script did not pass compares with what Megatron-DeepSpeed used, not with our default.
MEGATRON_DEEPSPEED_DEFAULTS = [
    "--init-method-std", "0.02",
    "--weight-decay", "0.01",
    "--adam-beta2", "0.999",
    "--lr-decay-style", "linear",
    "--log-interval", "100",
    "--eval-iters", "100",
    "--pp-partition-method", "parameters",
    "--position-embedding-type", "absolute",
    "--no-embed-layernorm",
    "--no-deepspeed",
    "--no-log-batch-size-to-tensorboard",
    "--no-log-validation-ppl-to-tensorboard",
]

# Published flags with no field here, and why nothing is lost (none today: every flag of the four
# scripts has one). Must stay flags the parser refuses: once a field exists, the value is compared.
NO_FIELD = {}

# DeepSpeed JSON keys with no field here, and why.
DS_NO_FIELD = {
    "steps_per_print": "DeepSpeed's own progress print; ours reports every log_interval",
    "wall_clock_breakdown": "false: DeepSpeed's timing breakdown, off in every script",
}

# Where a field's value is a path or machine-specific: not compared.
NOT_COMPARED = {
    "checkpoint.save", "checkpoint.load", "logging.tensorboard_dir", "training.kill_switch_path",
    "data.data_path", "data.split", "data.train_weighted_split_paths", "data.valid_weighted_split_paths",
    "data.train_weighted_split_paths_path", "data.valid_weighted_split_paths_path",
    "data.tokenizer_name_or_path", "finetune.pretrained", "parallel.deepspeed_config",
    "parallel.distributed_backend",
}

EXIT_20H = ("tr11b passed 5990, its 100-hour value, under a 20-hour job limit, so that stop never fired; ours is "
            "the job's limit minus 10 minutes (1190, bigscience's own value for 20 hours)", None)

# (recipe, field) -> (published value, our value, (reason, still_needed)). The recipe's comment gives
# the same reason. ``still_needed`` (when given) says whether the trainer still refuses the published
# value: once it accepts it, the deviation is no longer allowed and the recipe must take the value.
DEVIATIONS = {
    ("slurm/bloom-1b7.slurm", "training.exit_duration_in_mins"): (5990.0, 1190.0, EXIT_20H),
}


# ---- the published side -------------------------------------------------------------------------

def read_published(name):
    """(header {key: value}, trainer argv) of tests/recipes/published/NAME.args."""
    header, lines = {}, []
    for line in open(os.path.join(PUBLISHED, name + ".args"), encoding="utf-8"):
        m = re.match(r"#\s*(entry|cluster|deepspeed_config):\s*(.*)", line)
        if m:
            header[m.group(1)] = m.group(2).strip()
        elif line.strip() and not line.startswith("#"):
            lines.append(line)
    header["cluster"] = dict(kv.split("=") for kv in header["cluster"].split())
    return header, shlex.split(" ".join(lines))


def known_flags():
    return {s for action in build_parser()._actions for s in action.option_strings}


def split_flags(argv):
    """[(flag, [values])] of a flat argv."""
    out = []
    for token in argv:
        if token.startswith("--"):
            out.append((token, []))
        else:
            out[-1][1].append(token)
    return out


def published_config(name):
    """The published run as a RunConfig: Megatron-DeepSpeed defaults < flags < DeepSpeed JSON."""
    header, argv = read_published(name)
    known = known_flags()
    kept = []
    for flag, values in split_flags(argv):
        if flag in known:
            kept += [flag, *values]
        else:
            assert flag in NO_FIELD, f"{name}: published flag {flag} has no config field and no reason in NO_FIELD"
    cfg = resolve(["--model-name", MODEL_NAME[name], *MEGATRON_DEEPSPEED_DEFAULTS, *kept], header["entry"])
    with open(os.path.join(PUBLISHED, header["deepspeed_config"]), encoding="utf-8") as fh:
        apply_deepspeed_json(cfg, json.load(fh), name)
    return header, cfg


def apply_deepspeed_json(cfg, ds, name):
    """DeepSpeed's JSON over the flags; where both give a value they must agree (they did)."""
    t, p = cfg.training, cfg.parallel
    ds = dict(ds)
    assert ds.pop("train_micro_batch_size_per_gpu") == t.micro_batch_size, name
    assert ds.pop("train_batch_size") == t.global_batch_size, name
    assert ds.pop("gradient_clipping") == t.clip_grad, name
    assert ds.pop("zero_optimization") == {"stage": p.zero_stage}, name
    assert ds.pop("bf16", {}).get("enabled", False) == t.bf16, name
    fp16 = ds.pop("fp16", {"enabled": False})
    assert fp16.pop("enabled") == t.fp16, name
    if fp16:  # DeepSpeed's dynamic loss scaler: it, not Megatron's --initial-loss-scale etc., runs fp16
        t.loss_scale = fp16.pop("loss_scale") or None  # 0 means dynamic
        t.initial_loss_scale = 2.0 ** fp16.pop("initial_scale_power")
        t.loss_scale_window = fp16.pop("loss_scale_window")
        for key in ("hysteresis", "min_loss_scale"):
            setattr(t, key, fp16.pop(key))
        assert not fp16, f"{name}: fp16 keys not compared: {sorted(fp16)}"
    unknown = set(ds) - set(DS_NO_FIELD)
    assert not unknown, f"{name}: DeepSpeed JSON keys with no field and no reason in DS_NO_FIELD: {sorted(unknown)}"


def resolve(argv, entry):
    """parse_config, plus launch/finetune.py's BLOOMZ defaults for what argv leaves unset."""
    cfg = parse_config(argv)
    if entry == "finetune":
        from megatron_bloom.training.finetune import FINETUNE_DEFAULTS

        given = explicit_keys(argv)
        for section, values in FINETUNE_DEFAULTS.items():
            for key, value in values.items():
                if key not in given[section]:
                    setattr(getattr(cfg, section), key, value)
    return cfg


# ---- our side -----------------------------------------------------------------------------------

def sbatch_options(path):
    out = {}
    for line in open(path, encoding="utf-8"):
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:[= ](\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return out


def slurm_dry_run(path, tmp_path, **env):
    """(stdout, {entry, nodes, gpus_per_node, gpu}, trainer argv) of a recipe under DRY_RUN=1."""
    opts = sbatch_options(path)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    squeue = bindir / "squeue"  # the job's time limit, as SLURM would report it for this recipe
    squeue.write_text(f"#!/bin/sh\necho {opts['time']}\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    nodes = opts["nodes"]
    e = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, REPO=REPO, SLURM_NNODES=nodes, SLURM_JOB_ID="4242",
             SLURM_JOB_NODELIST=f"gpu[1-{nodes}]", MASTER_ADDR="gpu1", RUN_DIR=str(tmp_path / "run"),
             PATH=str(bindir) + os.pathsep + os.environ["PATH"], DS_ACCELERATOR="cpu")
    e.update(env)
    p = subprocess.run(["bash", path], capture_output=True, text=True, env=e, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    srun = shlex.split(next(line for line in p.stdout.splitlines() if line.startswith("+ srun "))[2:])
    torchrun = srun[srun.index("--") + 1:]
    entry_at = next(i for i, a in enumerate(torchrun) if a.startswith(os.path.join(REPO, "launch") + os.sep))
    preflight = shlex.split(next(line for line in p.stdout.splitlines() if line.startswith("=== pre-flight: "))
                            [len("=== pre-flight: "):])
    layout = {
        "entry": os.path.basename(torchrun[entry_at])[: -len(".py")],
        "nodes": torchrun[torchrun.index("--nnodes") + 1],
        "gpus-per-node": torchrun[torchrun.index("--nproc-per-node") + 1],
        "gpu": preflight[preflight.index("--gpu") + 1],
        "sbatch": opts,
    }
    return p.stdout, layout, torchrun[entry_at + 1:]


def recipe_config(recipe, entry, tmp_path, **env):
    path = os.path.join(REPO, recipe)
    if recipe.endswith(".yaml"):
        return None, resolve(["--config", path], entry)
    _, layout, argv = slurm_dry_run(path, tmp_path, **env)
    return layout, resolve(argv, entry)


# ---- comparison ---------------------------------------------------------------------------------

def flat(cfg):
    return {f"{section}.{key}": value for section, values in dataclasses.asdict(cfg).items()
            for key, value in values.items()}


def differences(recipe, published, ours):
    """Lines naming every field that differs and is not an allowed deviation, or an allowed one that no longer holds."""
    want, have = flat(published), flat(ours)
    problems = []
    for key in sorted(want):
        if key in NOT_COMPARED:
            continue
        allowed = DEVIATIONS.get((recipe, key))
        if allowed is not None:
            still_needed = allowed[2][1]
            if still_needed is not None and not still_needed():
                problems.append(f"{key}: the trainer accepts the published {allowed[0]!r} now; set it in {recipe} "
                                f"and drop the deviation ({allowed[2][0]})")
            elif (want[key], have[key]) != allowed[:2]:
                problems.append(f"{key}: listed deviation {allowed[0]!r} -> {allowed[1]!r} no longer holds "
                                f"(published {want[key]!r}, ours {have[key]!r}); update DEVIATIONS")
        elif want[key] != have[key]:
            problems.append(f"{key}: published {want[key]!r}, {recipe} {have[key]!r}")
    return problems


@pytest.mark.parametrize("name, recipe", RECIPES, ids=[r for _, r in RECIPES])
def test_recipe_equals_published(name, recipe, tmp_path):
    header, published = published_config(name)
    layout, ours = recipe_config(recipe, header["entry"], tmp_path)
    problems = differences(recipe, published, ours)
    cluster = header["cluster"]
    if layout is not None:  # the cluster, the launcher and the sbatch request
        for key in ("nodes", "gpus-per-node", "gpu"):
            if layout[key] != cluster[key]:
                problems.append(f"cluster {key}: published {cluster[key]}, {recipe} {layout[key]}")
        if layout["entry"] != header["entry"]:
            problems.append(f"entry: published {header['entry']}, {recipe} launch/{layout['entry']}.py")
        opts = layout["sbatch"]
        if opts["nodes"] != cluster["nodes"] or opts["gres"] != f"gpu:{cluster['gpus-per-node']}":
            problems.append(f"#SBATCH --nodes={opts['nodes']} --gres={opts['gres']}: published {cluster}")
    else:  # a YAML names no cluster: its layout must be valid on the published one
        world = int(cluster["nodes"]) * int(cluster["gpus-per-node"])
        validate_config(ours, world, for_training=False)
    assert not problems, f"{recipe} differs from bigscience's {name}:\n  " + "\n  ".join(problems)


def test_every_deviation_names_a_reason_and_a_compared_recipe():
    recipes = {r for _, r in RECIPES}
    for (recipe, key), (_, _, (reason, _)) in DEVIATIONS.items():
        assert recipe in recipes and key not in NOT_COMPARED, (recipe, key)
        assert len(reason) > 20, (recipe, key)
    for flag in NO_FIELD:  # a field added for one of these flags must be compared, not excused
        assert flag not in known_flags(), f"{flag} has a config field now: drop it from NO_FIELD"


def test_a_changed_value_is_caught(tmp_path):
    """The comparison sees a change in a YAML recipe and in a slurm recipe (environment override)."""
    header, published = published_config("tr11-176B-ml")
    yaml_path = tmp_path / "bloom-176b.yaml"
    text = open(os.path.join(REPO, "configs", "bloom-176b.yaml"), encoding="utf-8").read()
    changed = re.sub(r"(\n\s*adam_beta2:\s*)\S+", r"\g<1>0.999", text)
    assert changed != text
    yaml_path.write_text(changed)
    ours = resolve(["--config", str(yaml_path)], header["entry"])
    assert differences("configs/bloom-176b.yaml", published, ours) == [
        "training.adam_beta2: published 0.95, configs/bloom-176b.yaml 0.999"]
    assert differences("configs/bloom-176b.yaml", published, resolve(["--config", os.path.join(
        REPO, "configs", "bloom-176b.yaml")], header["entry"])) == []

    _, ours = recipe_config("slurm/bloom-176b.slurm", header["entry"], tmp_path, EVAL_ITERS="2")
    assert differences("slurm/bloom-176b.slurm", published, ours) == [
        "logging.eval_iters: published 1, slurm/bloom-176b.slurm 2"]
