"""Shared pieces of the finetuning tests: tiny data, runs of the launchers, greedy accuracy."""
import os
import subprocess
import sys
from typing import Dict, List, Tuple

from data_tools.make_tasks import read_tasks as read_rows  # noqa: F401 - the layout make_tasks writes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run_tool(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env(), timeout=timeout)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def launch(script: str, nproc: int, args: List[str], timeout: float = 400) -> subprocess.CompletedProcess:
    """launch/<script> as users run it: plain python for one process, torchrun otherwise."""
    from megatron_bloom.distributed import free_port

    path = os.path.join(REPO, "launch", script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), path, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)


def greedy_answers(checkpoint: str, tokenizer_dir: str, rows: List[dict], max_new_tokens: int = 8) -> List[str]:
    """Greedy continuation of each row's inputs, decoded and stripped (EOS ends it)."""
    import torch

    from megatron_bloom.data.tokenizer import load_tokenizer
    from megatron_bloom.generation import generate, load_model

    tok = load_tokenizer(tokenizer_dir)
    model = load_model(checkpoint).model
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = rows[start:start + 32]
            prompts = [tok.encode(r["inputs"]) for r in batch]
            new = generate(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=tok.eod_id, pad_token_id=tok.pad_id)
            for ids in new:
                ids = [t for t in ids if t != tok.eod_id]
                out.append(tok.backend.decode(ids).strip())
    return out


def accuracy(checkpoint: str, tokenizer_dir: str, rows: List[dict]) -> Tuple[float, Dict[str, float]]:
    """(exact-match accuracy, per task) of greedy answers against the targets."""
    answers = greedy_answers(checkpoint, tokenizer_dir, rows)
    hits: Dict[str, List[bool]] = {}
    for row, answer in zip(rows, answers):
        hits.setdefault(row["dataset"], []).append(answer == row["targets"].strip())
    total = [h for v in hits.values() for h in v]
    return sum(total) / len(total), {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def target_loss(checkpoint: str, tokenizer_dir: str, rows: List[dict]) -> float:
    """Token-mean loss of ' ' + target + EOS given the inputs, as the finetune packs them."""
    import torch

    from megatron_bloom.data.tokenizer import load_tokenizer
    from megatron_bloom.generation import load_model, prompt_logprobs

    tok = load_tokenizer(tokenizer_dir)
    model = load_model(checkpoint).model
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            inp = tok.encode(r["inputs"])
            tgt = tok.encode(" " + r["targets"]) + [tok.eod_id]
            lp = prompt_logprobs(model, inp + tgt)[len(inp) - 1:]
            total -= sum(lp)
            count += len(lp)
    return total / count


def packed_pairs_loss(checkpoint: str, paired, pairs) -> float:
    """Token-mean target loss of the given pairs (repeats counted), each scored alone and unpacked."""
    import torch

    from megatron_bloom.generation import load_model, prompt_logprobs

    model = load_model(checkpoint).model
    total, count = 0.0, 0
    with torch.no_grad():
        for i in pairs:
            inp, tgt = paired.inputs(i).tolist(), paired.targets(i).tolist()
            lp = prompt_logprobs(model, inp + tgt)[len(inp) - 1:]
            total -= sum(lp)
            count += len(lp)
    return total / count
