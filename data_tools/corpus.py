"""A corpus too large for one process, tokenized as a SLURM job array, as bigscience did for BLOOM.

    python data_tools/corpus.py plan --input en=raw/en fr=raw/fr/a.jsonl --output-dir out \\
        --tokenizer-name-or-path tok --files-per-task 4      # writes out/plan.json, prints N tasks
    python data_tools/corpus.py shard --plan out/plan.json --task 0     # one per array task 0..N-1
    python data_tools/corpus.py merge --plan out/plan.json              # once every shard is done
    python data_tools/corpus.py ratios --plan out/plan.json --alpha 0.3 --output out/ratios.json
    python data_tools/corpus.py splits --ratios out/ratios.json --train-output out/train.txt \\
        --valid-output out/valid.txt

slurm/preprocess.slurm runs these; see slurm/README.md.

- plan: every language's files (a folder counts every .jsonl/.jsonl.gz/.parquet under it, sorted),
  cut into tasks of --files-per-task consecutive files of one language. The plan is a file, so
  every task (and any rerun) reads the same slices, whatever appears in the folders later.
- shard: task I tokenizes its slice into out/shards/LANG/LANG_IIIII_text_document.{bin,idx}, written
  as `*.tmp` and renamed, then a `.done.json` record (documents, tokens). A task whose record
  exists is complete and is skipped; any other leftover of an earlier attempt is removed first.
- merge: per language, the shards in task order into out/merged/LANG/LANG_text_document; the
  merged documents and tokens must equal the sums of the shard records, or one `error:` line.
- ratios: bigscience's training_dataset_ratios.json format (`[{"dataset_path", "ratio"}]`), from
  the merged token counts with alpha sampling (data_tools/language_weights.py) or given ratios.
- splits: the train and valid split files exactly as bigscience's
  data/catalogue/load_ratios_meg_ds_format.py writes them (train 0:0.950, valid 0.950:1.0 plus one
  `valid_<folder>` group per dataset), for --train/--valid-weighted-split-paths-path.

Same inputs, same tokenizer: same bytes, whether a task ran once or was killed and rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from typing import Dict, List, Sequence

import numpy as np

from data_tools import run_tool
from data_tools.language_weights import alpha_weights
from data_tools.merge_datasets import merge
from data_tools.preprocess_data import build_parser as preprocess_parser
from data_tools.preprocess_data import preprocess
from megatron_bloom.atomic import atomic_write_text
from megatron_bloom.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path
from megatron_bloom.errors import ArgumentParser, UserError

PLAN_VERSION = 1
INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
# bigscience's document ranges (load_ratios_meg_ds_format.py TOKEN_RANGES).
TRAIN_RANGE, VALID_RANGE = "0:0.950", "0.950:1.0"
# Test hook: the task with this id SIGKILLs itself after its first file, on its first attempt only
# (SLURM_RESTART_COUNT unset or 0), as a node failure would; tests check the rerun's bytes.
KILL_HOOK = "MEGATRON_BLOOM_CORPUS_KILL_TASK"


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------


def language_files(path: str) -> List[str]:
    """The input files of one language: the file itself, or every input file under the folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such file or folder; give LANG=FILE or LANG=FOLDER")
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(INPUT_SUFFIXES))
    if not found:
        raise UserError(f"{path}: no {', '.join(INPUT_SUFFIXES)} file under this folder; point LANG= at the files")
    return found


def parse_inputs(items: Sequence[str]) -> Dict[str, List[str]]:
    """{lang: [files]} from LANG=PATH items (a language may be given several times); sorted by language."""
    out: Dict[str, List[str]] = {}
    for item in items:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise UserError(f"--input {item!r} is not LANG=PATH; write e.g. en=raw/en (a file or a folder)")
        if "/" in lang or any(c.isspace() or c in ',:"' for c in lang):
            raise UserError(f"--input {item!r}: language {lang!r} names a folder and a split group; use letters, digits, - or _")
        out.setdefault(lang, []).extend(language_files(path))
    if not out:
        raise UserError("--input names no language; give LANG=PATH items")
    for lang, files in out.items():
        dupes = sorted({f for f in files if files.count(f) > 1})
        if dupes:
            raise UserError(f"language {lang}: {dupes[0]} is given twice; each file must be tokenized once")
    return dict(sorted(out.items()))


def make_tasks(files: Dict[str, List[str]], files_per_task: int) -> List[dict]:
    """Tasks of at most files_per_task consecutive files of one language, languages in sorted order.

    >>> [(t["lang"], t["index"], len(t["files"])) for t in make_tasks({"en": list("abcde"), "fr": ["x"]}, 2)]
    [('en', 0, 2), ('en', 1, 2), ('en', 2, 1), ('fr', 0, 1)]
    """
    if files_per_task < 1:
        raise UserError(f"--files-per-task {files_per_task} must be >= 1")
    tasks = []
    for lang, paths in files.items():
        for index, start in enumerate(range(0, len(paths), files_per_task)):
            tasks.append({"lang": lang, "index": index, "files": paths[start:start + files_per_task]})
    return tasks


def shard_prefix(output_dir: str, lang: str, index: int) -> str:
    return os.path.join(output_dir, "shards", lang, f"{lang}_{index:05d}_text_document")


def merged_prefix(output_dir: str, lang: str) -> str:
    # The language is the parent folder: load_ratios_meg_ds_format.py names valid groups after it.
    return os.path.join(output_dir, "merged", lang, f"{lang}_text_document")


def write_plan(inputs: Sequence[str], output_dir: str, tokenizer: str, files_per_task: int, json_key: str = "text",
               append_eod: bool = True) -> dict:
    files = parse_inputs(inputs)
    if not os.path.exists(tokenizer):
        raise UserError(f"--tokenizer-name-or-path {tokenizer}: not found; the array tasks need a local tokenizer "
                        f"(a folder from data_tools/train_tokenizer.py or a tokenizer.json)")
    tasks = make_tasks(files, files_per_task)
    for task in tasks:  # sizes pin the inputs: a file that changes later is refused by its task
        task["sizes"] = [os.path.getsize(f) for f in task["files"]]
    plan = {"version": PLAN_VERSION, "output_dir": output_dir, "tokenizer": tokenizer, "json_key": json_key,
            "append_eod": append_eod, "languages": list(files), "tasks": tasks}
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "plan.json"), json.dumps(plan, indent=1) + "\n")
    return plan


def read_plan(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--plan {path}: no such file; write it with `data_tools/corpus.py plan`")
    with open(path, encoding="utf-8") as fh:
        plan = json.load(fh)
    if plan.get("version") != PLAN_VERSION:
        raise UserError(f"--plan {path}: version {plan.get('version')}, expected {PLAN_VERSION}; re-run `corpus.py plan`")
    return plan


# --------------------------------------------------------------------------------------------------
# shard
# --------------------------------------------------------------------------------------------------


def done_path(prefix: str) -> str:
    return prefix + ".done.json"


def dataset_counts(prefix: str) -> dict:
    ds = MMapIndexedDataset(prefix)
    return {"documents": int(len(ds.doc_idx) - 1), "tokens": int(np.asarray(ds.sizes).sum(dtype=np.int64))}


def shard(plan: dict, task_id: int, workers: int = 1) -> dict:
    """Tokenize task `task_id`'s slice into its shard; skipped when its record says it is done."""
    tasks = plan["tasks"]
    if not 0 <= task_id < len(tasks):
        raise UserError(f"--task {task_id}: the plan has tasks 0..{len(tasks) - 1}; submit --array=0-{len(tasks) - 1}")
    task = tasks[task_id]
    prefix = shard_prefix(plan["output_dir"], task["lang"], task["index"])
    if os.path.isfile(done_path(prefix)):
        with open(done_path(prefix), encoding="utf-8") as fh:
            return dict(json.load(fh), skipped=True)
    for path, size in zip(task["files"], task["sizes"]):
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise UserError(f"task {task_id}: {path} is missing or changed size since the plan ({size} bytes); "
                            f"re-run `corpus.py plan` and every task")
    # Whatever an earlier attempt left (parts, *.tmp, a shard without its record) is redone.
    parts_dir = prefix + ".parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    for path in (data_file_path(prefix), index_file_path(prefix)):
        for leftover in (path, path + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
    parts = []
    for i, path in enumerate(task["files"]):
        part = os.path.join(parts_dir, f"part{i:05d}")
        argv = ["--input", path, "--output-prefix", part, "--tokenizer-name-or-path", plan["tokenizer"],
                "--json-keys", plan["json_key"], "--workers", str(workers), "--quiet"]
        preprocess(preprocess_parser().parse_args(argv + (["--append-eod"] if plan["append_eod"] else [])))
        parts.append(f"{part}_{plan['json_key']}_document")
        if os.environ.get(KILL_HOOK) == str(task_id) and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            print(f"{KILL_HOOK}={task_id}: killing task {task_id} after part {i}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    merge(parts, prefix)  # *.tmp then rename, the .idx last
    record = {"task": task_id, "lang": task["lang"], "files": task["files"], **dataset_counts(prefix)}
    atomic_write_text(done_path(prefix), json.dumps(record, indent=1) + "\n")
    shutil.rmtree(parts_dir, ignore_errors=True)
    return dict(record, skipped=False)


# --------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------


def merge_language(plan: dict, lang: str) -> dict:
    """Merge one language's shards in task order; the result must hold exactly the shards' documents and tokens."""
    out = plan["output_dir"]
    tasks = [t for t in plan["tasks"] if t["lang"] == lang]
    prefixes = [shard_prefix(out, lang, t["index"]) for t in tasks]
    missing = [plan["tasks"].index(t) for t, p in zip(tasks, prefixes) if not os.path.isfile(done_path(p))]
    if missing:
        raise UserError(f"{lang}: shard tasks {', '.join(map(str, missing))} have not completed; "
                        f"rerun them (sbatch --array={','.join(map(str, missing))} slurm/preprocess.slurm) before merging")
    records = []
    for p in prefixes:
        with open(done_path(p), encoding="utf-8") as fh:
            records.append(json.load(fh))
    expected = {k: sum(r[k] for r in records) for k in ("documents", "tokens")}
    target = merged_prefix(out, lang)
    merge(prefixes, target)
    got = dataset_counts(target)
    if got != expected:
        raise UserError(f"{lang}: merged {target} holds {got['documents']} documents / {got['tokens']} tokens but its "
                        f"{len(records)} shard records sum to {expected['documents']} / {expected['tokens']}; a shard "
                        f"changed after its task ended: delete {os.path.join(out, 'shards', lang)} and rerun its tasks")
    return {"lang": lang, "prefix": target, "shards": len(prefixes), **got}


# --------------------------------------------------------------------------------------------------
# ratios and split files
# --------------------------------------------------------------------------------------------------


def ratios_list(prefixes: Sequence[str], tokens: Sequence[int], alpha: float = None, given: Dict[str, float] = None,
                langs: Sequence[str] = ()) -> List[dict]:
    """[{"dataset_path", "ratio"}] in bigscience's training_dataset_ratios.json shape."""
    if given:
        unknown = sorted(set(given) - set(langs))
        absent = [lang for lang in langs if lang not in given]
        if unknown or absent:
            problems = ([f"{', '.join(unknown)} not in the plan"] if unknown else []) + \
                       ([f"no ratio for {', '.join(absent)}"] if absent else [])
            raise UserError(f"--ratio: {'; '.join(problems)}; give one LANG=R per language ({', '.join(langs)})")
        ratios = [given[lang] for lang in langs]
    else:
        ratios = alpha_weights(tokens, alpha).tolist()
    return [{"dataset_path": p, "ratio": float(r)} for p, r in zip(prefixes, ratios)]


def split_files_text(ratios: Sequence[dict]) -> tuple:
    """(train, valid) split file texts, byte for byte as load_ratios_meg_ds_format.py writes them.

    Their script formats the ratio with Python's str() of the JSON value and names each extra
    validation group `valid_` + the dataset path's parent folder.
    """
    seen = {}
    for r in ratios:
        path = r["dataset_path"]
        parts = path.split("/")
        if len(parts) < 2 or not parts[-2]:
            raise UserError(f"dataset_path {path!r} has no parent folder; its validation group is named after it "
                            f"(bigscience's layout: .../LANG/PREFIX)")
        if any(c.isspace() or c in ',"' for c in path):
            raise UserError(f"dataset_path {path!r} holds whitespace, a comma or a quote, which the split-file parser splits on; rename it")
        if parts[-2] in seen:
            raise UserError(f"{seen[parts[-2]]} and {path} share the folder {parts[-2]!r}: both validation groups would be "
                            f"valid_{parts[-2]}; put each dataset in its own folder")
        seen[parts[-2]] = path

    def entries(span):
        return ", ".join(f"{r['ratio']} {span} {r['dataset_path']}" for r in ratios)

    train = f'"train: {entries(TRAIN_RANGE)}"\n'
    extra = " ".join(f'"valid_{r["dataset_path"].split("/")[-2]}: 1 {VALID_RANGE} {r["dataset_path"]}"' for r in ratios)
    valid = f'"valid: {entries(VALID_RANGE)}" {extra}\n'
    return train, valid


def read_ratios(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as fh:
        ratios = json.load(fh)
    if not isinstance(ratios, list) or not ratios or not all(
            isinstance(r, dict) and set(r) >= {"dataset_path", "ratio"} for r in ratios):
        raise UserError(f"--ratios {path}: expected a JSON list of {{\"dataset_path\": ..., \"ratio\": ...}}")
    return ratios


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="corpus.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("plan", help="cut the inputs into tasks; writes OUTPUT_DIR/plan.json, prints the task count")
    s.add_argument("--input", nargs="+", required=True, help="LANG=FILE or LANG=FOLDER items")
    s.add_argument("--output-dir", required=True)
    s.add_argument("--tokenizer-name-or-path", required=True, help="a local tokenizer folder or tokenizer.json")
    s.add_argument("--files-per-task", type=int, default=1)
    s.add_argument("--json-key", default="text")
    s.add_argument("--no-append-eod", action="store_true", help="do not end documents with the eos token")
    s = sub.add_parser("shard", help="tokenize one task's files into its shard")
    s.add_argument("--plan", required=True)
    s.add_argument("--task", type=int, default=None, help="task id (default: $SLURM_ARRAY_TASK_ID)")
    s.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: $SLURM_CPUS_PER_TASK or all cores)")
    s = sub.add_parser("merge", help="merge each language's shards and check the counts")
    s.add_argument("--plan", required=True)
    s = sub.add_parser("ratios", help="write bigscience's ratios JSON from the merged datasets")
    s.add_argument("--plan", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--alpha", type=float, default=0.3, help="p_i ~ (tokens_i / total) ** alpha (language_weights.py)")
    s.add_argument("--ratio", nargs="+", default=None, metavar="LANG=R", help="given ratios instead of alpha sampling")
    s = sub.add_parser("splits", help="write train/valid split files from a ratios JSON")
    s.add_argument("--ratios", required=True)
    s.add_argument("--train-output", required=True)
    s.add_argument("--valid-output", required=True)
    return p


def _parse_given(items: Sequence[str]) -> Dict[str, float]:
    out = {}
    for item in items:
        lang, _, value = item.partition("=")
        try:
            out[lang] = float(value)
        except ValueError:
            raise UserError(f"--ratio {item!r} is not LANG=NUMBER") from None
        if not out[lang] > 0:
            raise UserError(f"--ratio {item!r}: a ratio must be > 0; leave the language out of the plan instead")
    return out


def corpus_command(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        plan = write_plan(args.input, args.output_dir, args.tokenizer_name_or_path, args.files_per_task,
                          args.json_key, not args.no_append_eod)
        langs = {lang: sum(t["lang"] == lang for t in plan["tasks"]) for lang in plan["languages"]}
        print(f"plan: {len(plan['tasks'])} tasks ({', '.join(f'{k} {v}' for k, v in langs.items())}) -> "
              f"{os.path.join(args.output_dir, 'plan.json')}", file=sys.stderr)
        print(len(plan["tasks"]))
    elif args.command == "shard":
        plan = read_plan(args.plan)
        task = args.task if args.task is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        if task is None:
            raise UserError("shard: give --task or run inside a SLURM job array")
        workers = args.workers or _default_workers()
        if workers < 1:
            raise UserError(f"--workers {workers} must be >= 1")
        r = shard(plan, int(task), workers)
        state = "already complete, skipped" if r["skipped"] else "done"
        print(f"shard {task} ({r['lang']}): {state}: {r['documents']:,} documents, {r['tokens']:,} tokens", file=sys.stderr)
    elif args.command == "merge":
        plan = read_plan(args.plan)
        for lang in plan["languages"]:
            r = merge_language(plan, lang)
            print(f"merged {lang}: {r['shards']} shards, {r['documents']:,} documents, {r['tokens']:,} tokens "
                  f"(equal to the shards' sums) -> {r['prefix']}", file=sys.stderr)
    elif args.command == "ratios":
        plan = read_plan(args.plan)
        langs = plan["languages"]
        prefixes = [merged_prefix(plan["output_dir"], lang) for lang in langs]
        for p in prefixes:
            if not os.path.isfile(index_file_path(p)):
                raise UserError(f"{index_file_path(p)} not found; run `corpus.py merge --plan {args.plan}` first")
        tokens = [dataset_counts(p)["tokens"] for p in prefixes]
        if args.ratio is None and not args.alpha > 0:
            raise UserError(f"--alpha {args.alpha} must be > 0 (1 = proportional to tokens, smaller = flatter)")
        ratios = ratios_list(prefixes, tokens, args.alpha, _parse_given(args.ratio) if args.ratio else None, langs)
        atomic_write_text(args.output, json.dumps(ratios, indent=2) + "\n")
        for lang, n, r in zip(langs, tokens, ratios):
            print(f"{lang}: {n:,} tokens, ratio {r['ratio']:.6g}", file=sys.stderr)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        train, valid = split_files_text(read_ratios(args.ratios))
        atomic_write_text(args.train_output, train)
        atomic_write_text(args.valid_output, valid)
        print(f"wrote {args.train_output} and {args.valid_output}", file=sys.stderr)
    return 0


def main(argv=None) -> None:
    """``python data_tools/corpus.py`` and ``megatron-bloom-corpus``."""
    run_tool(corpus_command, argv)


if __name__ == "__main__":
    main()
