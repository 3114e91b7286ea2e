"""Changing layout on resume through DeepSpeed's universal checkpoints.

A checkpoint saved at one (TP, PP, DP) is converted once (``ds_to_universal``) into one file per
parameter holding the whole, unsharded fp32 weight and its Adam moments; any layout can then load
it. How a parameter's TP shards merge is told by regex patterns over the pipeline's parameter
names, derived from the model's sharding table and published with every save
(``universal_checkpoint_info`` on the module):

    column-parallel (query_key_value, dense_h_to_4h, their biases)  concatenated on dim 0 (default)
    row-parallel    (self_attention.dense, dense_4h_to_h weights)   concatenated on dim 1
    replicated      (LayerNorms, row-parallel biases)               one copy taken, copies must match
    vocabulary      (word_embeddings.weight)                        concatenated, then padding rows
                                                                    stripped to ``original_vocab_size``
    pipeline copy   (the tied embedding on the last stage)          dropped; the first stage's kept

query_key_value rows are stored per head ([heads, 3, head_dim]), so concatenating TP shards on dim 0
restores the exact single-device layout; no sub-parameter handling is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict

from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.spec import get_model_spec

_PATTERNS = get_model_spec().sharding.universal_patterns()
TP_REPLICATED = _PATTERNS["tp_replicated_parameter_patterns"]
ROW_PARALLEL = _PATTERNS["parameter_with_row_parallelism_patterns"]
VOCABULARY = _PATTERNS["vocabulary_parameter_patterns"]


def universal_checkpoint_info(cfg: ModelConfig) -> Dict[str, Any]:
    return {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": TP_REPLICATED,
        "parameter_with_row_parallelism_patterns": ROW_PARALLEL,
        "vocabulary_parameter_patterns": VOCABULARY,
        "pipeline_replicated_parameter_patterns": _PATTERNS["pipeline_replicated_parameter_patterns"],
        "original_vocab_size": cfg.vocab_size,
        "parameter_to_average_patterns": [],
    }


def refuse_drifted_copies(path: str, cfg: ModelConfig) -> None:
    """Stop before converting a checkpoint whose TP-duplicated copies differ.

    DeepSpeed's converter asserts that the copies of every ``tp_replicated`` parameter are equal;
    this says which ones are not, by how much, and what to do, instead of its AssertionError.
    """
    from megatron_bloom.checkpoint.native import tp_duplicated_drift

    drifted = tp_duplicated_drift(path, cfg)
    if drifted:
        key, drift = max(drifted, key=lambda kv: kv[1])
        raise UserError(
            f"{path}: the TP copies of duplicated parameters differ ({len(drifted)} of them; the most: '{key}', by {drift:.3g}), "
            f"so changing the layout cannot merge them; resume at the saved layout (with "
            f"--sync-tp-duplicated-parameters to keep the copies equal from there), or export with "
            f"'convert_checkpoint.py native-to-hf' (which averages them) and start from the export"
        )


def _with_universal_info(source: str, staging: str, cfg: ModelConfig) -> str:
    """A folder DeepSpeed's converter accepts for a checkpoint whose engine files lack
    ``universal_checkpoint_info`` (Megatron-DeepSpeed's own): links to every file of ``source``,
    the engine files rewritten with BLOOM's patterns added. Returns ``staging``."""
    from megatron_bloom.checkpoint.files import MP_RANK_FILE_RE, atomic_torch_save
    from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable
    from megatron_bloom.checkpoint.trust import load_megatron_state

    os.makedirs(staging, exist_ok=True)
    for name in sorted(os.listdir(source)):
        src, dst = os.path.join(source, name), os.path.join(staging, name)
        if os.path.lexists(dst) or not os.path.isfile(src):
            continue
        if MP_RANK_FILE_RE.match(name):
            state = load_megatron_state(src)  # weights-only, with the args allow-list
            state.setdefault("universal_checkpoint_info", universal_checkpoint_info(cfg))
            with megatron_enums_importable():
                atomic_torch_save(state, dst)
        else:
            os.symlink(os.path.abspath(src), dst)
    return staging


def convert_to_universal(checkpoint_dir: str, tag: str, output_dir: str, cfg: ModelConfig, workers: int = 1) -> None:
    """Run DeepSpeed's converter on ``checkpoint_dir/tag`` into ``output_dir/tag`` (one process).

    Written under a temporary name and renamed when complete, so a conversion killed halfway is
    redone rather than half-loaded. A Megatron-DeepSpeed checkpoint gets BLOOM's merge patterns
    (which its engine files lack) in a staging folder of links first.
    """
    import shutil

    from megatron_bloom.checkpoint.files import STATE_FILE

    final = os.path.join(output_dir, tag)
    if os.path.isdir(final):
        return
    source = os.path.join(checkpoint_dir, tag)
    refuse_drifted_copies(source, cfg)
    staging = None
    if not os.path.isfile(os.path.join(source, STATE_FILE)):
        staging = _with_universal_info(source, final + ".staging", cfg)
    tmp = final + ".converting"
    cmd = [
        # DeepSpeed's converter, with Megatron's enums resolvable (engine files hold its args).
        sys.executable, "-m", "megatron_bloom.checkpoint.run_with_megatron_enums", "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", staging or source,
        "--output_folder", tmp,
        "--num_extract_workers", str(workers),
        "--num_merge_workers", str(workers),
    ]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"converting {checkpoint_dir}/{tag} to a universal checkpoint failed: " + " | ".join(tail))
    os.replace(tmp, final)
    if staging:
        shutil.rmtree(staging, ignore_errors=True)

