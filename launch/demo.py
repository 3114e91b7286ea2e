#!/usr/bin/env python
"""`make demo`: the whole workflow on a laptop-sized default, on CPU, in a few minutes.

Stages: synthetic multilingual corpus -> BLOOM-style tokenizer -> Megatron .bin/.idx ->
pretraining at TP=2 x PP=2 on 4 processes (gloo) with TensorBoard -> export to a transformers
folder, reloaded with transformers -> generation. Every stage runs the same command a user would
type; a failing stage is named and its output shown.

    python launch/demo.py [--out demo_out] [--train-iters 150]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def banner(n: int, total: int, title: str) -> None:
    print(f"\n=== [{n}/{total}] {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run(stage: str, cmd: list, env: dict | None = None, show: str = "tail") -> str:
    """Run one stage; stream its output; on failure say which stage failed and exit."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if show == "all" or (show == "progress" and _interesting(line)):
            print("  " + line.rstrip(), flush=True)
    proc.wait()
    if proc.returncode != 0:
        print("".join(lines[-40:]), file=sys.stderr)
        print(f"\ndemo failed in stage '{stage}' (exit code {proc.returncode})", file=sys.stderr)
        raise SystemExit(1)
    if show == "tail":
        for line in lines[-3:]:
            print("  " + line.rstrip())
    print(f"  ({time.time() - start:.1f} s)", flush=True)
    return "".join(lines)


def _interesting(line: str) -> bool:
    return line.startswith((" iteration", " validation", "> ", "---")) or "error" in line.lower()


def reload_with_transformers(folder: str) -> None:
    """The exported folder is an ordinary transformers checkpoint: load it and score a sentence."""
    try:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids
        loss = model(ids, labels=ids).loss.item()
    except Exception as exc:  # noqa: BLE001 - name the stage, then stop
        print(f"demo failed in stage 'reload' ({type(exc).__name__}: {exc})", file=sys.stderr)
        raise SystemExit(1)
    params = sum(p.numel() for p in model.parameters())
    print(f"  transformers loaded {type(model).__name__} ({params:,} parameters); loss on a sample sentence {loss:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "demo_out"))
    ap.add_argument("--train-iters", type=int, default=150)
    ap.add_argument("--corpus-mb", type=float, default=3.0)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    corpus, tok = os.path.join(out, "corpus.jsonl"), os.path.join(out, "tokenizer")
    prefix, ckpt, tb = os.path.join(out, "corpus"), os.path.join(out, "pretrain"), os.path.join(out, "tensorboard")
    hf = os.path.join(out, "hf-export")
    total, t0 = 6, time.time()

    banner(1, total, "synthetic multilingual corpus")
    run("corpus", [py, "data_tools/make_corpus.py", "--output", corpus, "--size-mb", str(args.corpus_mb)], env)

    banner(2, total, "BLOOM-style byte-level BPE tokenizer")
    run("tokenizer", [py, "data_tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "1000",
                      "--output-dir", tok], env)

    banner(3, total, "preprocess to Megatron .bin/.idx")
    run("preprocess", [py, "data_tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
                       "--tokenizer-name-or-path", tok, "--json-keys", "text", "--append-eod", "--workers", "2"], env)

    banner(4, total, "pretrain a tiny BLOOM at TP=2 x PP=2 on 4 CPU processes")
    run("pretrain", [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                     "launch/pretrain.py", "--config", "configs/demo.yaml",
                     "--data-path", prefix + "_text_document", "--tokenizer-name-or-path", tok,
                     "--train-iters", str(args.train_iters), "--save", ckpt, "--load", ckpt,
                     "--tensorboard-dir", tb], env, show="progress")

    banner(5, total, "export to a transformers folder and reload it with transformers")
    run("export", [py, "launch/convert_checkpoint.py", "native-to-hf", "--load", ckpt, "--out", hf,
                   "--tokenizer", tok], env)
    reload_with_transformers(hf)

    banner(6, total, "generate from the exported model")
    for prompt in ("The history of", "La ville de"):
        text = run("generate", [py, "launch/generate.py", "--load", hf, "--prompt", prompt, "--max-new-tokens", "20",
                                "--greedy"], env, show="none")
        print(f"  {prompt!r} -> {text.strip()!r}")

    print(f"\ndemo finished in {time.time() - t0:.0f} s. Outputs in {out}")
    print(f"TensorBoard logs: {tb}\n  view them with: {py} -m tensorboard.main --logdir {tb}")


if __name__ == "__main__":
    main()
