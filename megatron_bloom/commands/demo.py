"""`make demo`: pretrain a tiny BLOOM, finetune it BLOOMZ-style, and show what finetuning changed.

Stages, each the command a user would type (printed before it runs):

  1. data        a small multilingual corpus and xP3-style tasks (copy / translate / reverse in
                 en, fr, es, de), with held-out items that never occur in training
                 (data_tools/make_tasks.py)
  2. tokenizer   a byte-level BPE trained on corpus + task text, so both share it
  3. preprocess  corpus -> Megatron .bin/.idx; tasks -> paired datasets per language + mixture file
  4. pretrain    TP=2 x PP=2 on 4 processes (torchrun, gloo), TensorBoard logs (configs/demo.yaml)
  5. export      to a transformers folder, reloaded with transformers
  6. finetune    from that folder on packed prompt/answer pairs, DP=2 on 2 processes (torchrun),
                 TensorBoard logs (configs/demo-finetune.yaml)
  7. evaluate    greedy answers to held-out prompts before and after finetuning: a table from
                 launch/generate.py and the exact-match accuracy over all held-out prompts

A failure ends with ``demo failed in stage '<name>'`` (exit code 1) after the stage's last output
lines; the demo also fails if finetuning did not raise the held-out accuracy. Rerunning with the
same ``--out`` starts over (the demo only ever deletes its own folders inside it).

    python launch/demo.py [--out demo_out] [--pretrain-iters 400] [--finetune-iters 200]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from data_tools.make_tasks import read_tasks
from megatron_bloom.cli import entry_point
from megatron_bloom.errors import UserError

# The stages run the repo's own scripts and configs (launch/, data_tools/, configs/) from its root.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("data", "tokenizer", "preprocess", "pretrain", "export", "finetune", "evaluate")
MARKER = ".megatron-bloom-demo"  # marks an --out folder the demo may clean up
TASKS = ("copy", "translate", "reverse")
TABLE_ROWS_PER_TASK = 2
MAX_NEW_TOKENS = 8  # held-out answers are 1-3 number words


class StageFailed(Exception):
    """A stage's command or check failed; the message says how, ``output`` is what it printed last."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "demo_out"), help="folder for everything the demo writes")
    p.add_argument("--pretrain-iters", "--train-iters", type=int, default=None,
                   help="pretraining iterations (default: configs/demo.yaml's 400)")
    p.add_argument("--finetune-iters", type=int, default=None,
                   help="finetuning iterations (default: configs/demo-finetune.yaml's 200)")
    p.add_argument("--num-train", type=int, default=3000, help="training prompt/answer pairs")
    p.add_argument("--num-heldout", type=int, default=150, help="held-out prompts the accuracy is measured on")
    p.add_argument("--no-check", action="store_true",
                   help="do not fail when finetuning leaves the held-out accuracy where it was (short runs)")
    p.add_argument("--fail-stage", choices=STAGES, default=None,
                   help="make this stage fail on purpose (to see or test the failure report)")
    return p


class Demo:
    """Numbered stages with timing; any failure inside one names it and ends the demo."""

    def __init__(self, fail_stage: Optional[str]):
        self.fail_stage = fail_stage
        self.number = 0
        self.started = time.time()
        self.env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)  # torchrun --standalone brings its own

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        self.number += 1
        head = f"=== [{self.number}/{len(STAGES)}] {title} ==="
        print(f"\n{head}", flush=True)
        start = time.time()
        try:
            if name == self.fail_stage:
                raise StageFailed("failure injected with --fail-stage")
            yield
        except StageFailed as exc:
            self._failed(name, str(exc), exc.output)
        except UserError as exc:
            self._failed(name, str(exc))
        except Exception as exc:  # noqa: BLE001 - any error: name the stage, then stop
            self._failed(name, f"{type(exc).__name__}: {exc}")
        print(f"  ({name}: {time.time() - start:.1f} s)", flush=True)

    def _failed(self, name: str, why: str, output: str = "") -> None:
        if output:
            print(f"--- last output of stage '{name}' ---\n{output.rstrip()}", file=sys.stderr)
        print(f"\ndemo failed in stage '{name}' after {time.time() - self.started:.0f} s: {why}", file=sys.stderr,
              flush=True)
        raise SystemExit(1)

    def run(self, cmd: Sequence[str], progress: Optional[str] = None) -> str:
        """Run a command from the repo root; print a progress line per training log line when
        ``progress`` names the run, else its last lines. Raise StageFailed with its tail on error."""
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines: List[str] = []
        for line in proc.stdout:
            lines.append(line)
            shown = progress_line(progress, line) if progress else None
            if shown:
                print("  " + shown, flush=True)
        proc.wait()
        if proc.returncode != 0:
            script = next((os.path.basename(c) for c in cmd if c.endswith(".py")), os.path.basename(cmd[0]))
            raise StageFailed(f"{script} exited with code {proc.returncode}", "".join(lines[-30:]))
        if not progress:
            for line in lines[-2:]:
                print("  " + line.rstrip(), flush=True)
        return "".join(lines)


_ITERATION = re.compile(r"^ iteration\s+(\d+)/\s*(\d+) \|.*?elapsed time per iteration \(ms\): ([\d.]+)")
_LOSS = re.compile(r"lm loss: ([\d.E+-]+)")
_VALIDATION = re.compile(r"^ validation loss at iteration (\d+) \| (.*)")


def progress_line(run: str, line: str) -> Optional[str]:
    """A training log line as a progress bar (validation results and '> ' notices pass through)."""
    m = _ITERATION.match(line)
    if m:
        done, total, ms = int(m.group(1)), int(m.group(2)), float(m.group(3))
        loss = _LOSS.search(line)
        filled = round(30 * done / max(total, 1))
        bar = "#" * filled + "." * (30 - filled)
        text = f"{run:<8} [{bar}] {done:>4}/{total} | {ms:6.0f} ms/it"
        return text + (f" | lm loss {float(loss.group(1)):.3f}" if loss else "")
    m = _VALIDATION.match(line)
    if m:
        return f"{run:<8} validation at {m.group(1)}: " + m.group(2).rstrip(" |")
    if line.startswith("> ") and any(w in line for w in ("training", "converted", "resum", "packed", "saved")):
        return line.rstrip()
    return None


def prepare_out(out: str) -> Dict[str, str]:
    """Create --out (or clean the demo's own folders from an earlier run); the paths used."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out} ({exc.strerror}); pass a folder you can write to") from None
    marker = os.path.join(out, MARKER)
    if os.listdir(out) and not os.path.exists(marker):
        raise UserError(f"--out {out} is not empty and was not made by the demo; pass a new or empty folder")
    paths = {k: os.path.join(out, k) for k in ("tasks", "tokenizer", "xp3", "pretrain", "hf-export", "finetune",
                                               "tensorboard")}
    paths.update(corpus=os.path.join(out, "corpus.jsonl"), tok_text=os.path.join(out, "tokenizer-text.jsonl"),
                 prefix=os.path.join(out, "corpus"), tb_pretrain=os.path.join(out, "tensorboard", "pretrain"),
                 tb_finetune=os.path.join(out, "tensorboard", "finetune"))
    for key in ("tasks", "tokenizer", "xp3", "pretrain", "hf-export", "finetune", "tensorboard"):
        shutil.rmtree(paths[key], ignore_errors=True)
    open(marker, "w").close()
    return paths


def write_tokenizer_text(paths: Dict[str, str]) -> None:
    """Corpus + every training prompt and answer, so the tokenizer has merges for both."""
    with open(paths["tok_text"], "w", encoding="utf-8") as fh:
        for r in read_tasks(os.path.join(paths["tasks"], "train")):
            fh.write(json.dumps({"text": r["inputs"] + " " + r["targets"]}, ensure_ascii=False) + "\n")
        with open(paths["corpus"], encoding="utf-8") as corpus:
            shutil.copyfileobj(corpus, fh)


def table_rows(heldout: List[dict]) -> List[dict]:
    """A few held-out rows for the before/after table: per task, rows in different languages."""
    picked = []
    for task in TASKS:
        langs = set()
        for r in heldout:
            if r["dataset"] == task and r["language"] not in langs and len(langs) < TABLE_ROWS_PER_TASK:
                langs.add(r["language"])
                picked.append(r)
    return picked


def generate_cli(demo: Demo, checkpoint: str, tokenizer: str, prompts: List[str]) -> List[str]:
    """Greedy answers from launch/generate.py, as a user would ask for them."""
    cmd = [sys.executable, "launch/generate.py", "--load", checkpoint, "--tokenizer", tokenizer, "--greedy",
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]
    for p in prompts:
        cmd += ["--prompt", p]
    out = demo.run(cmd, progress="generate")
    answers = [json.loads(line)["text"].strip() for line in out.splitlines() if line.startswith("{")]
    if len(answers) != len(prompts):
        raise StageFailed(f"launch/generate.py gave {len(answers)} answers for {len(prompts)} prompts")
    return answers


def heldout_accuracy(checkpoint: str, tokenizer_dir: str, rows: List[dict]) -> Tuple[float, Dict[str, float]]:
    """Greedy exact match over ``rows`` in this process (batched, KV cache), overall and per task."""
    import torch

    from megatron_bloom.generation import generate, load_model

    loaded = load_model(checkpoint, tokenizer=tokenizer_dir)
    tok, eos, pad = loaded.tokenizer, loaded.ids.eos, loaded.ids.pad
    hits: Dict[str, List[bool]] = {}
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = rows[start:start + 32]
            prompts = [tok(r["inputs"], add_special_tokens=False)["input_ids"] for r in batch]
            new = generate(loaded.model, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
            for r, ids in zip(batch, new):
                answer = tok.decode(ids, skip_special_tokens=True).strip()
                hits.setdefault(r["dataset"], []).append(answer == r["targets"].strip())
    every = [h for v in hits.values() for h in v]
    return sum(every) / len(every), {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def reload_with_transformers(folder: str, sample: str) -> None:
    """The exported folder is an ordinary transformers checkpoint: load it and score a task prompt."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar would break the stage's lines
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(sample, return_tensors="pt").input_ids
    loss = model(ids, labels=ids).loss.item()
    params = sum(p.numel() for p in model.parameters())
    print(f"  transformers loaded {type(model).__name__} ({params:,} parameters) from {folder}; "
          f"loss on {sample!r}: {loss:.3f}", flush=True)


def tensorboard_command() -> str:
    """``tensorboard`` beside this python (a venv's), else the module form, which always works."""
    script = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    return script if os.access(script, os.X_OK) else f"{sys.executable} -m tensorboard.main"


def print_table(rows: List[dict], before: List[str], after: List[str]) -> None:
    head = ("prompt", "expected", "before finetuning", "after finetuning")
    cells = [(r["inputs"], r["targets"], b or "(nothing)", a or "(nothing)") for r, b, a in zip(rows, before, after)]
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(4)]
    fmt = "  " + " | ".join(f"{{:<{w}}}" for w in widths) + " | {}"
    print(fmt.format(*head, "ok after"))
    print("  " + "-+-".join("-" * w for w in widths) + "-+---------")
    for row, cell in zip(rows, cells):
        print(fmt.format(*cell, "yes" if cell[3] == row["targets"].strip() else "no"))


def run_demo(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--pretrain-iters", args.pretrain_iters), ("--finetune-iters", args.finetune_iters),
                        ("--num-train", args.num_train), ("--num-heldout", args.num_heldout)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    out = os.path.abspath(args.out)
    paths = prepare_out(out)
    py, demo = sys.executable, Demo(args.fail_stage)
    torchrun = [py, "-m", "torch.distributed.run", "--standalone"]

    with demo.stage("data", "a small multilingual corpus and xP3-style tasks (data_tools/make_tasks.py)"):
        demo.run([py, "data_tools/make_tasks.py", "--output", paths["tasks"], "--tasks", *TASKS, "--max-words", "2",
                  "--num-train", str(args.num_train), "--num-heldout", str(args.num_heldout),
                  "--corpus", paths["corpus"], "--seed", "0"])
        heldout = read_tasks(os.path.join(paths["tasks"], "heldout"))
        for r in heldout[:: max(1, len(heldout) // 3)][:3]:
            print(f"  held-out example: {r['inputs']!r} -> {r['targets']!r}")

    with demo.stage("tokenizer", "BLOOM-style byte-level BPE tokenizer on corpus + task text"):
        write_tokenizer_text(paths)
        demo.run([py, "data_tools/train_tokenizer.py", "--input", paths["tok_text"], "--vocab-size", "512",
                  "--output-dir", paths["tokenizer"]])

    with demo.stage("preprocess", "preprocess: corpus -> .bin/.idx, tasks -> paired datasets + mixture"):
        demo.run([py, "data_tools/preprocess_data.py", "--input", paths["corpus"], "--output-prefix", paths["prefix"],
                  "--tokenizer-name-or-path", paths["tokenizer"], "--append-eod", "--workers", "1", "--quiet"])
        for split, extra in (("train", ["--split-by", "language"]), ("heldout", [])):
            demo.run([py, "data_tools/preprocess_xp3.py", "--input", os.path.join(paths["tasks"], split),
                      "--output-prefix", os.path.join(paths["xp3"], split), "--tokenizer-name-or-path",
                      paths["tokenizer"], "--prepend-space", *extra])

    with demo.stage("pretrain", "pretrain a tiny BLOOM at TP=2 x PP=2 on 4 CPU processes (gloo)"):
        iters = [] if args.pretrain_iters is None else ["--train-iters", str(args.pretrain_iters)]
        demo.run([*torchrun, "--nproc-per-node", "4", "launch/pretrain.py", "--config", "configs/demo.yaml",
                  "--data-path", paths["prefix"] + "_text_document", "--tokenizer-name-or-path", paths["tokenizer"],
                  *iters, "--save", paths["pretrain"], "--load", paths["pretrain"],
                  "--tensorboard-dir", paths["tb_pretrain"]], progress="pretrain")

    with demo.stage("export", "export to a transformers folder and reload it with transformers"):
        demo.run([py, "launch/convert_checkpoint.py", "native-to-hf", "--load", paths["pretrain"],
                  "--out", paths["hf-export"], "--tokenizer", paths["tokenizer"]])
        reload_with_transformers(paths["hf-export"], heldout[0]["inputs"] + " " + heldout[0]["targets"])

    with demo.stage("finetune", "finetune it BLOOMZ-style on the tasks, DP=2 on 2 processes (torchrun)"):
        iters = [] if args.finetune_iters is None else ["--train-iters", str(args.finetune_iters)]
        demo.run([*torchrun, "--nproc-per-node", "2", "launch/finetune.py", "--config", "configs/demo-finetune.yaml",
                  "--pretrained", paths["hf-export"],
                  "--train-weighted-split-paths-path", os.path.join(paths["xp3"], "train.mixture.txt"),
                  "--valid-weighted-split-paths", f"heldout: 1 0:1 {os.path.join(paths['xp3'], 'heldout')}",
                  *iters, "--save", paths["finetune"], "--load", paths["finetune"],
                  "--tensorboard-dir", paths["tb_finetune"]], progress="finetune")

    with demo.stage("evaluate", "held-out prompts: greedy answers before and after finetuning"):
        shown = table_rows(heldout)
        prompts = [r["inputs"] for r in shown]
        before = generate_cli(demo, paths["hf-export"], paths["tokenizer"], prompts)
        after = generate_cli(demo, paths["finetune"], paths["tokenizer"], prompts)
        print()
        print_table(shown, before, after)
        acc_before, tasks_before = heldout_accuracy(paths["hf-export"], paths["tokenizer"], heldout)
        acc_after, tasks_after = heldout_accuracy(paths["finetune"], paths["tokenizer"], heldout)
        print(f"\n  held-out exact match over {len(heldout)} prompts: {acc_before:.1%} before -> {acc_after:.1%} after")
        for task in tasks_after:
            print(f"    {task:<10} {tasks_before.get(task, 0.0):6.1%} -> {tasks_after[task]:6.1%}")
        if acc_after <= acc_before and not args.no_check:
            raise StageFailed(f"finetuning did not raise the held-out accuracy ({acc_before:.1%} -> {acc_after:.1%})")

    print(f"\ndemo finished in {time.time() - demo.started:.0f} s; everything is in {out}")
    print(f"TensorBoard logs:\n  pretrain: {paths['tb_pretrain']}\n  finetune: {paths['tb_finetune']}")
    print(f"view them with:\n  {tensorboard_command()} --logdir {paths['tensorboard']}", flush=True)
    return 0


def main(argv=None) -> None:
    """``launch/demo.py``, ``make demo`` and ``megatron-bloom-demo``."""
    entry_point(run_demo)(argv)
