"""Preprocessing throughput: wall-clock MB/s and tokens/s of data_tools/preprocess_data.py.

Generates a synthetic multilingual corpus (data_tools/make_corpus.py, documents of 50-600 words),
trains a byte-level BPE like BLOOM's on part of it, then times the preprocessing CLI as a user
runs it: a fresh process per run, so interpreter start, imports and worker start-up are included.
Also times a sequential read of the result through MMapIndexedDataset, and the job-array path of
slurm/preprocess.slurm on this machine: the corpus cut into --array-tasks files, `corpus.py shard`
run for every task at once (as array tasks sharing one node would, --array-workers tokenizer
processes each), then `corpus.py merge`. Per task: its own MB/s; for the array: all bytes over the
wall time from the first start to the last end, and the merge time. slurm/README.md scales the
per-task number to a cluster.

    python benchmarks/preprocess.py                      # 100 MB, 1 and 2 workers, markdown table
    python benchmarks/preprocess.py --json               # ... and one JSON object as the last line
    python benchmarks/preprocess.py --size-mb 20 --workers 1 2 4
    python benchmarks/preprocess.py --array-tasks 2 --array-workers 1 --plot plots/
    python benchmarks/preprocess.py --megatron-deepspeed ../Megatron-DeepSpeed --array-tasks 0

MB here is 10^6 bytes of jsonl input. `--megatron-deepspeed DIR` also times Megatron-DeepSpeed's
tools/preprocess_data.py: their script, run from DIR (a checkout of
bigscience-workshop/Megatron-DeepSpeed) in this Python, on the same corpus and tokenizer folder
with the same worker counts, alternating with ours; its rows join the table, and both outputs are
read back to report whether they hold the same token ids (benchmarks/megatron_deepspeed.py).
Other processes on the machine slow every number; the load average is printed with the results.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import megatron_deepspeed
from benchmarks.common import add_output_args, finish, format_run_info, run_info
from megatron_bloom.data.indexed_dataset import MMapIndexedDataset
from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.errors import UserError, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mb", type=float, default=100.0, help="corpus size (10^6 bytes)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--train-sample-mb", type=float, default=20.0, help="MB of the corpus the tokenizer is trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per worker count (alternating); the fastest is reported")
    p.add_argument("--work-dir", default=None, help="keep corpus and outputs here (default: a temporary folder)")
    p.add_argument("--array-tasks", type=int, default=2, help="array tasks run at once (0: skip the array measurement)")
    p.add_argument("--array-workers", type=int, default=1, help="tokenizer processes per array task")
    p.add_argument("--megatron-deepspeed", metavar="DIR", default=None,
                   help="also time DIR/tools/preprocess_data.py (a Megatron-DeepSpeed checkout) and compare its token ids")
    add_output_args(p)
    return p.parse_args(argv)


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], cwd: str | None = None, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and the workers it waited for)."""
    cpu, start = _cpu_of_children(), time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"benchmark step failed: {' '.join(cmd)}: {last}")
    return elapsed, _cpu_of_children() - cpu


def timed_run(cmd: list[str], dataset: str, size: int, workers: int, cwd: str | None = None, env: dict | None = None) -> dict:
    """One preprocessing run: wall and CPU time, and what it wrote to the `dataset` prefix."""
    load_before = os.getloadavg()[0]
    # CPU seconds show the work done whatever else runs on the machine; wall is what users see.
    wall, cpu = _run(cmd, cwd, env)
    ds = MMapIndexedDataset(dataset)
    tokens = int(ds.sizes.sum(dtype=np.int64))
    return {
        "workers": workers, "wall_s": wall, "mb_per_s": size / wall / 1e6, "tokens_per_s": tokens / wall,
        "cpu_s": cpu, "mb_per_cpu_s": size / cpu / 1e6,
        "documents": len(ds), "tokens": tokens, "load_avg_1min_before": load_before,
    }  # fmt: skip


def prepare_megatron_deepspeed(path: str, work: str) -> dict:
    """The checkout, the environment its script runs in, and what importing it takes; fails in one line."""
    checkout = megatron_deepspeed.check_checkout(path)
    env, notes = megatron_deepspeed.environment(work)
    found = megatron_deepspeed.preflight(checkout, env)
    return {"dir": checkout, "commit": megatron_deepspeed.checkout_commit(checkout), "env": env, "compat": notes,
            "import_s": found["import_s"], "versions": found["versions"]}


def sequential_read(prefix: str) -> dict:
    ds = MMapIndexedDataset(prefix)
    start = time.perf_counter()
    tokens = 0
    for i in range(len(ds)):
        tokens += ds[i].size
    elapsed = time.perf_counter() - start
    return {"sequences_per_s": len(ds) / elapsed, "tokens_per_s": tokens / elapsed, "sequences": len(ds)}


def array_run(args, work: str, corpus: str, tok_dir: str) -> dict:
    """The corpus cut into --array-tasks files, every `corpus.py shard` at once, then `corpus.py merge`."""
    raw = os.path.join(work, "array_raw", "xx")
    os.makedirs(raw, exist_ok=True)
    with open(corpus, "rb") as fh:
        lines = fh.readlines()
    n = args.array_tasks
    for i in range(n):  # contiguous, near-equal runs of lines
        with open(os.path.join(raw, f"part{i:03d}.jsonl"), "wb") as fh:
            fh.writelines(lines[i * len(lines) // n:(i + 1) * len(lines) // n])
    out = os.path.join(work, "array_out")
    tool = os.path.join(REPO, "data_tools", "corpus.py")
    _run([sys.executable, tool, "plan", "--input", f"xx={raw}", "--output-dir", out, "--tokenizer-name-or-path", tok_dir,
          "--files-per-task", "1"])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    procs = [(i, time.perf_counter(), subprocess.Popen(
        [sys.executable, tool, "shard", "--plan", os.path.join(out, "plan.json"), "--task", str(i), "--workers",
         str(args.array_workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)) for i in range(n)]
    ended, cpu = {}, {}
    while len(ended) < n:  # poll, so each task's end is seen when it happens, not in task order
        for i, _, proc in procs:
            if i in ended:
                continue
            # wait4: the task's own CPU seconds (with its tokenizer processes), robust to other load.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                ended[i], cpu[i] = time.perf_counter(), usage.ru_utime + usage.ru_stime
                proc.returncode = os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    tasks = []
    for i, began, proc in procs:
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise UserError(f"corpus.py shard --task {i} failed: {(err.strip().splitlines() or ['?'])[-1]}")
        size = os.path.getsize(os.path.join(raw, f"part{i:03d}.jsonl"))
        wall = ended[i] - began
        tasks.append({"task": i, "wall_s": wall, "mb": size / 1e6, "mb_per_s": size / wall / 1e6, "cpu_s": cpu[i],
                      "mb_per_cpu_s": size / cpu[i] / 1e6})
    array_wall = max(ended.values()) - start
    merge_wall, _ = _run([sys.executable, tool, "merge", "--plan", os.path.join(out, "plan.json")])
    total = sum(t["mb"] for t in tasks)
    return {"tasks": n, "workers_per_task": args.array_workers, "per_task": tasks, "array_wall_s": array_wall,
            "array_mb_per_s": total / array_wall, "merge_s": merge_wall,
            "with_merge_mb_per_s": total / (array_wall + merge_wall),
            "load_avg_1min_before": load_before}


def bench(args, work: str) -> dict:
    # Their script's imports are checked before the corpus is made, so a missing module costs seconds.
    mds = prepare_megatron_deepspeed(args.megatron_deepspeed, work) if args.megatron_deepspeed else None
    tools = os.path.join(REPO, "data_tools")
    corpus, tok_dir = os.path.join(work, "corpus.jsonl"), os.path.join(work, "tokenizer")
    t_corpus, _ = _run([sys.executable, os.path.join(tools, "make_corpus.py"), "--output", corpus, "--size-mb", str(args.size_mb), "--seed", str(args.seed)])
    t_train, _ = _run([sys.executable, os.path.join(tools, "train_tokenizer.py"), "--input", corpus, "--vocab-size", str(args.vocab_size),
                    "--output-dir", tok_dir, "--sample-mb", str(args.train_sample_mb)])  # fmt: skip
    size = os.path.getsize(corpus)
    # Worker counts (and ours and theirs) alternate within each repeat so that load from other
    # processes, which comes and goes, hits every run alike; the fastest wall time per run is reported.
    best: dict[int, dict] = {}
    theirs: dict[int, dict] = {}
    for _ in range(args.repeats):
        for workers in args.workers:
            prefix = os.path.join(work, f"out_w{workers}")
            cmd = [sys.executable, os.path.join(tools, "preprocess_data.py"), "--input", corpus, "--output-prefix", prefix,
                   "--tokenizer-name-or-path", tok_dir, "--json-keys", "text", "--append-eod", "--workers", str(workers), "--quiet"]  # fmt: skip
            run = timed_run(cmd, f"{prefix}_text_document", size, workers)
            if workers not in best or run["wall_s"] < best[workers]["wall_s"]:
                best[workers] = run
            if mds:
                out = os.path.join(work, f"mds_w{workers}")
                cmd = megatron_deepspeed.command(corpus, out, tok_dir, workers)
                run = timed_run(cmd, megatron_deepspeed.output_prefix(out), size, workers, cwd=mds["dir"], env=mds["env"])
                if workers not in theirs or run["wall_s"] < theirs[workers]["wall_s"]:
                    theirs[workers] = dict(run, command=cmd)
    runs = [best[w] for w in args.workers]
    if mds:
        # Ours runs with --append-eod, so theirs does too; an EOD id the comparison can name.
        eod_id = load_tokenizer(tok_dir).eod_id
        for w, run in theirs.items():
            run["ids"] = megatron_deepspeed.compare(os.path.join(work, f"out_w{w}_text_document"),
                                                    megatron_deepspeed.output_prefix(os.path.join(work, f"mds_w{w}")), eod_id)
        cmd = theirs[args.workers[-1]]["command"]
        mds = {k: v for k, v in mds.items() if k != "env"}
        mds.update(runs=[{k: v for k, v in theirs[w].items() if k != "command"} for w in args.workers],
                   run=run_info(cmd[2:], program=cmd[1]))
    read = sequential_read(f"{os.path.join(work, f'out_w{args.workers[-1]}')}_text_document")
    array = array_run(args, work, corpus, tok_dir) if args.array_tasks > 0 else None
    return {
        "array": array,
        "corpus_mb": size / 1e6, "corpus_gen_s": t_corpus, "tokenizer_train_s": t_train, "vocab_size": args.vocab_size,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "runs": runs, "sequential_read": read, "megatron_deepspeed": mds,
    }  # fmt: skip


def print_table(res: dict) -> None:
    print(format_run_info(res["run"]) + "\n")
    print(
        f"corpus {res['corpus_mb']:.1f} MB (generated in {res['corpus_gen_s']:.1f}s), {res['vocab_size']}-token BPE "
        f"(trained in {res['tokenizer_train_s']:.1f}s), {res['cpus']} CPUs\n"
    )
    mds = res["megatron_deepspeed"]
    rows = [("megatron_bloom", r) for r in res["runs"]] + [("Megatron-DeepSpeed", r) for r in (mds["runs"] if mds else [])]
    print("| tool | workers | wall s | MB/s | tokens/s | CPU s | MB per CPU s | load avg before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tool, r in rows:
        print(
            f"| {tool} | {r['workers']} | {r['wall_s']:.1f} | {r['mb_per_s']:.2f} | {r['tokens_per_s'] / 1e6:.2f}M | "
            f"{r['cpu_s']:.1f} | {r['mb_per_cpu_s']:.2f} | {r['load_avg_1min_before']:.2f} |"
        )
    if mds:
        print_megatron_deepspeed(res)
    read = res["sequential_read"]
    print(
        f"\nMMapIndexedDataset sequential read: {read['sequences_per_s']:,.0f} sequences/s, "
        f"{read['tokens_per_s'] / 1e6:,.0f}M tokens/s ({read['sequences']:,} sequences)"
    )
    array = res["array"]
    if array:
        print(f"\njob array on this machine (corpus.py shard x {array['tasks']} at once, "
              f"{array['workers_per_task']} tokenizer process(es) each):\n")
        print("| task | MB | wall s | MB/s | CPU s | MB per CPU s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for t in array["per_task"]:
            print(f"| {t['task']} | {t['mb']:.1f} | {t['wall_s']:.1f} | {t['mb_per_s']:.2f} | {t['cpu_s']:.1f} | {t['mb_per_cpu_s']:.2f} |")
        print(f"\narray: {res['corpus_mb']:.1f} MB in {array['array_wall_s']:.1f} s = {array['array_mb_per_s']:.2f} MB/s; "
              f"merge {array['merge_s']:.1f} s; with merge {array['with_merge_mb_per_s']:.2f} MB/s; "
              f"load avg before {array['load_avg_1min_before']:.2f}")


def print_megatron_deepspeed(res: dict) -> None:
    mds = res["megatron_deepspeed"]
    where = f"commit {mds['commit']}" if mds["commit"] else "not a git checkout, commit unknown"
    print(f"\nMegatron-DeepSpeed's tools/preprocess_data.py, run in {mds['dir']} ({where}):")
    print(format_run_info(mds["run"]))
    others = [str(r["workers"]) for r in mds["runs"][:-1]]
    versions = ", ".join(f"{k} {v}" for k, v in mds["versions"].items() if v)
    print(f"({versions}; importing the script took {mds['import_s']:.1f} s in a check before the runs, a part of each run's wall time"
          + (f"; the other rows ran it with --workers {', '.join(others)})" if others else ")"))
    for note in mds["compat"]:
        print(f"note: {note}")
    for ours, theirs in zip(res["runs"], mds["runs"]):
        ids = theirs["ids"]
        print(f"token ids, {theirs['workers']} worker(s): {'match' if ids['match'] else 'DIFFER'}: {ids['explanation']}")
    ratios = ", ".join(f"{ours['mb_per_s'] / theirs['mb_per_s']:.2f}x with {ours['workers']} worker(s)"
                       for ours, theirs in zip(res["runs"], mds["runs"]))
    print(f"megatron_bloom / Megatron-DeepSpeed wall MB/s: {ratios}")


def plot(res: dict, out_dir: str) -> list:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    labels = [f"preprocess_data\n{r['workers']} workers" for r in res["runs"]]
    values = [r["mb_per_s"] for r in res["runs"]]
    if res["megatron_deepspeed"]:
        labels += [f"Megatron-DS\n{r['workers']} workers" for r in res["megatron_deepspeed"]["runs"]]
        values += [r["mb_per_s"] for r in res["megatron_deepspeed"]["runs"]]
    if res["array"]:
        labels += [f"array task {t['task']}" for t in res["array"]["per_task"]] + ["array"]
        values += [t["mb_per_s"] for t in res["array"]["per_task"]] + [res["array"]["array_mb_per_s"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 3.5))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("MB/s of jsonl (wall)")
    ax.set_title(f"preprocessing, {res['corpus_mb']:.0f} MB, {res['cpus']} CPUs")
    return [save_figure(fig, out_dir, "preprocess_throughput.png")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.array_tasks < 0 or args.array_workers < 1:
        raise UserError("--array-tasks must be >= 0 and --array-workers >= 1")
    if args.megatron_deepspeed:
        megatron_deepspeed.check_checkout(args.megatron_deepspeed)  # a wrong DIR fails before any work
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
        res = bench(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as work:
            res = bench(args, work)
    res["run"] = run_info(argv)
    print_table(res)
    finish(res, args, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
