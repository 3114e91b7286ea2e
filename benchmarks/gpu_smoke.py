"""`make gpu-smoke`: every entry point once on one NVIDIA GPU (NCCL, world size 1), checked, in minutes.

Steps, each the command a user would type (printed before it runs, its output kept in a log file):

  1. data      tasks + plain-text corpus (data_tools/make_tasks.py), a byte-level BPE tokenizer,
               corpus -> .bin/.idx, tasks -> paired xP3-style datasets + mixture file
  2. pretrain  N steps, bf16, SDPA attention, ZeRO-1, NCCL; saves at N/2 and N (the straight run)
  3. resume    from the N/2 checkpoint to N; its loss curve must equal the straight run's bitwise
               (TensorBoard "lm-loss-training/lm loss", float32 bits, every resumed step)
  4. finetune  M steps, fp16 (dynamic loss scale), from the pretrain checkpoint on the pairs
  5. generate  launch/generate.py --device cuda on the finetuned checkpoint (greedy, 2 prompts)
  6. evaluate  launch/evaluate.py --device cuda: perplexity on held-out corpus lines
  7. export    launch/convert_checkpoint.py native-to-hf, reloaded with transformers on the GPU;
               its logits on a prompt must match ours (fp32, atol/rtol 1e-4)
  8. sdpa      which scaled_dot_product_attention kernel the model's attention runs: torch.profiler
               over one forward in the training shape and dtype, in training mode (dropout, grad)
               and in inference mode; flash, memory-efficient, cuDNN or math, from op/kernel names

The summary names the SDPA kernel, the peak GPU memory the training logs report (``max allocated MB``
and ``max reserved MB`` of the ``memory after iteration`` lines; "n/a" where the log has none) and
the training tokens/s (median of the logged iterations after the first). Exit code 0 after the
summary; 1 when a step fails, after that step's last output lines and one last line
``gpu-smoke failed at step '<step>' ...``; 2 without a GPU (one ``error:`` line).

    python benchmarks/gpu_smoke.py                 # one GPU (about 1-2 minutes on an H100)
    python benchmarks/gpu_smoke.py --device cpu    # the same steps on CPU: gloo, fp32, tiny sizes

``--device cpu`` is a rehearsal of the same code: only the backend (gloo), the dtypes (fp32: bf16 and
fp16 matmuls are emulated on most CPUs, tens of times slower), the sizes and the step counts change.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from megatron_bloom.errors import ArgumentParser, fail, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("data", "pretrain", "resume", "finetune", "generate", "evaluate", "export", "sdpa")
LOSS_TAG = "lm-loss-training/lm loss"
VOCAB_SIZE = 512  # the tokenizer trained in step 1; the model's vocabulary
COMMAND_TIMEOUT_S = 900  # one command; a hung collective ends the smoke run instead of the GPU loan
LOGITS_TOLERANCE = 1e-4  # fp32 on both sides; only the attention kernels (SDPA vs baddbmm) differ


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the device changes: backend, dtypes, sizes and step counts. Nothing else differs."""

    backend: str
    pretrain_dtype: str  # also the dtype of generate, evaluate and the SDPA probe
    finetune_dtype: str
    pretrain_steps: int
    finetune_steps: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int  # 2 micro-batches per step: gradient accumulation runs too
    corpus_lines: int


PROFILES = {
    # Head size 64, as BLOOM's, so the fused SDPA kernels are eligible.
    "cuda": Profile("nccl", "bf16", "fp16", 20, 10, 256, 4, 4, 256, 8, 16, 4000),
    "cpu": Profile("gloo", "fp32", "fp32", 6, 3, 64, 2, 4, 64, 2, 4, 2000),
}
DTYPE_FLAGS = {"fp32": [], "bf16": ["--bf16"],
               # From the default initial scale (2^32) the dynamic scale would halve itself, one
               # skipped step each, for about 20 steps before the first update.
               "fp16": ["--fp16", "--initial-loss-scale", "4096"]}


class StepFailed(Exception):
    """A step's command or check failed; ``output`` is what it printed last."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def parse_args(argv=None):
    p = ArgumentParser(prog="gpu_smoke.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (the smoke run: NCCL, bf16/fp16) or cpu (its rehearsal: gloo, fp32, tiny sizes)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="even, >= 4 (default: cuda 20, cpu 6)")
    p.add_argument("--finetune-steps", type=int, default=None, help=">= 1 (default: cuda 10, cpu 3)")
    p.add_argument("--work-dir", default=None,
                   help="folder for inputs, checkpoints and logs (default: a new temporary folder, deleted after "
                        "a passing run, kept after a failure)")
    p.add_argument("--fail-step", choices=STEPS, default=None,
                   help="make this step fail on purpose (to see or test the failure report)")
    p.add_argument("--break-resume", action="store_true",
                   help="resume with twice the learning rate, so the bitwise resume check must fail (tests the check)")
    return p.parse_args(argv)


def check_device(device: str) -> None:
    """One ``error:`` line and exit 2 when ``device`` cannot run here."""
    import torch

    if device != "cuda":
        return
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else f"; torch {torch.__version__} is a CPU-only build"
        fail(f"gpu-smoke needs an NVIDIA GPU: torch.cuda.is_available() is False here{build} "
             f"(use --device cpu for a CPU rehearsal)")
    import torch.distributed as dist

    if not dist.is_nccl_available():
        fail(f"gpu-smoke needs NCCL: torch {torch.__version__} was built without it")


class Smoke:
    """Numbered steps with timing and a log file each; a failure names its step and ends the run."""

    def __init__(self, device: str, work: str, fail_step: Optional[str]):
        self.device, self.work, self.fail_step = device, work, fail_step
        self.number, self.started = 0, time.time()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                        DS_ACCELERATOR="cuda" if device == "cuda" else "cpu")
        if device == "cuda":
            # cuBLAS picks reproducible algorithms only with a fixed workspace: the resume check
            # compares float bits, and run-to-run noise must not be mistaken for a resume bug.
            self.env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        else:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on a GPU machine stays on the CPU
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)  # one process of its own, on a free port

    @contextlib.contextmanager
    def step(self, name: str, title: str) -> Iterator[None]:
        self.number += 1
        print(f"\n=== [{self.number}/{len(STEPS)}] {name}: {title} ===", flush=True)
        start = time.time()
        try:
            if name == self.fail_step:
                raise StepFailed("failure injected with --fail-step")
            yield
        except StepFailed as exc:
            self._failed(name, str(exc), exc.output)
        except Exception as exc:  # noqa: BLE001 - a bug or a library error: name the step, show where
            self._failed(name, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        print(f"  ({name}: {time.time() - start:.1f} s)", flush=True)

    def _failed(self, name: str, why: str, output: str) -> None:
        if output:
            print(f"--- last output of step '{name}' ---\n{output.rstrip()}", file=sys.stderr)
        print(f"gpu-smoke failed at step '{name}' after {time.time() - self.started:.0f} s: {why} "
              f"(inputs, checkpoints and logs kept in {self.work})", file=sys.stderr, flush=True)
        raise SystemExit(1)

    def run(self, cmd: Sequence[str], log_name: str) -> str:
        """Run ``cmd`` from the repo root, its output into ``<work>/logs/<log_name>.log``; return it.

        Raises StepFailed with the output's last lines when it exits non-zero or times out."""
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        log_path = os.path.join(self.work, "logs", f"{log_name}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            # A session of its own: a timeout ends the command and anything it started, nothing else.
            proc = subprocess.Popen(list(cmd), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        with open(log_path, encoding="utf-8", errors="replace") as log:
            output = log.read()
        tail = "".join(output.splitlines(keepends=True)[-30:])
        script = next((os.path.basename(c) for c in cmd if c.endswith(".py")), os.path.basename(cmd[0]))
        if code is None:
            raise StepFailed(f"{script} did not finish within {COMMAND_TIMEOUT_S} s (log: {log_path})", tail)
        if code != 0:
            raise StepFailed(f"{script} exited with code {code} (log: {log_path})", tail)
        return output


# ---- reading the training logs --------------------------------------------------------------------

_ITERATION = re.compile(r"^ iteration\s+(\d+)/")
_MEMORY = re.compile(r"^ memory after iteration (\d+) \|(.*)$")


def log_field(line: str, name: str) -> Optional[float]:
    """The number after ``name: `` in a ``|``-separated training log line, else None."""
    m = re.search(rf"\| {re.escape(name)}: ([-+\d.eE]+|nan|inf) ", line)
    return float(m.group(1)) if m else None


def iteration_lines(output: str) -> List[str]:
    return [line for line in output.splitlines() if _ITERATION.match(line)]


def tokens_per_second(output: str) -> Optional[float]:
    """Median ``tokens per second`` of the logged iterations after the first (which pays the warm-up)."""
    values = [v for v in (log_field(line, "tokens per second") for line in iteration_lines(output)[1:]) if v]
    return statistics.median(values) if values else None


def peak_memory(output: str) -> Dict[str, float]:
    """Rank 0's values of the last ``memory after iteration`` line, e.g. ``{"max rss MB": 512.3}``."""
    last = [m.group(2) for m in map(_MEMORY.match, output.splitlines()) if m]
    fields = {}
    for part in (last[-1].split("|") if last else []):
        m = re.match(r"\s*(.+?): rank 0 ([-+\d.eE]+|nan)", part)
        if m:
            fields[m.group(1)] = float(m.group(2))
    return fields


@dataclasses.dataclass
class TrainFacts:
    """What one training run's log says: losses, throughput, memory (rank 0)."""

    dtype: str
    losses: List[float]
    tokens_per_s: Optional[float]
    memory: Dict[str, float]
    skipped: int = 0

    def memory_text(self) -> str:
        def mb(name: str) -> str:
            return f"{self.memory[name]:,.0f} MB" if name in self.memory else "n/a"

        return (f"max allocated {mb('max allocated MB')}, max reserved {mb('max reserved MB')} "
                f"(max rss {mb('max rss MB')})")

    def tokens_text(self) -> str:
        return "n/a" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"

    def describe(self) -> str:
        skipped = f" ({self.skipped} skipped)" if self.skipped else ""
        return (f"loss {self.losses[0]:.3f} -> {self.losses[-1]:.3f}{skipped}; tokens/s {self.tokens_text()}; "
                f"{self.memory_text()}")


def tensorboard_scalars(tb_dir: str, tag: str) -> Dict[int, float]:
    """{step: value} of a TensorBoard tag over every event file in tb_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def float32_bits(value: float) -> bytes:
    return struct.pack("<f", value)


def compare_curves(straight: Dict[int, float], resumed: Dict[int, float], steps: Iterable[int]) -> Optional[str]:
    """None when ``resumed`` holds exactly ``steps`` with the straight run's float32 bits, else why not."""
    steps = list(steps)
    if sorted(resumed) != steps:
        return f"the resumed run logged losses at steps {sorted(resumed)}, expected {steps}"
    for step in steps:
        if step not in straight:
            return f"the straight run logged no loss at step {step}"
        if float32_bits(resumed[step]) != float32_bits(straight[step]):
            # The first resumed loss is a forward of the restored weights on the restored data
            # position: a difference there is the restore's. Later ones can also come from a kernel
            # whose backward sums in a varying order (atomics), which a rerun of the straight run shows.
            where = "the first resumed step" if step == steps[0] else f"after {step - steps[0]} resumed update(s)"
            return (f"resumed loss differs from the straight run's from step {step} on ({where}): "
                    f"{resumed[step]!r} vs {straight[step]!r} (difference {resumed[step] - straight[step]:.3g})")
    return None


# ---- the SDPA kernel ----------------------------------------------------------------------------

# aten ops, then kernel names. cuDNN's kernels are named "..._flash_..." too: it is looked for first.
_SDPA_KINDS = (
    ("cuDNN", ("_scaled_dot_product_cudnn_attention", "cudnn_attention", "cudnn_generated_fort_native_sdpa")),
    ("flash (CPU)", ("_scaled_dot_product_flash_attention_for_cpu",)),
    ("flash", ("_scaled_dot_product_flash_attention", "_flash_attention_forward", "flash_fwd_kernel")),
    ("memory-efficient", ("_scaled_dot_product_efficient_attention", "_efficient_attention_forward", "fmha_cutlass")),
    ("math", ("_scaled_dot_product_attention_math",)),
)


def sdpa_kind(names: Iterable[str]) -> Optional[str]:
    """Which SDPA implementation ran, from the profiled op and kernel names (None: no SDPA call seen)."""
    names = [n.lower() for n in names]
    for kind, markers in _SDPA_KINDS:
        if any(marker.lower() in name for name in names for marker in markers):
            return kind
    return None


def profile_attention(model, ids, device: str):
    """(kind, SDPA op and kernel names) of one forward of ``model`` on ``ids`` under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # With grad in training mode, as the trainer calls it: the kernel choice depends on it.
    with torch.set_grad_enabled(model.training):
        model(ids)  # warm-up: the first call may pick and compile kernels
        with torch_profile(activities=activities) as prof:
            model(ids)
            if device == "cuda":
                torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    # Kernel names are long templates; their start says which family they belong to.
    return sdpa_kind(names), sorted({n[:80] for n in names if sdpa_kind([n]) is not None})


def attention_kernels(checkpoint: str, profile: Profile, device: str) -> Dict[str, str]:
    """The SDPA kernel in training (dropout on) and in inference (eval mode), training shape and dtype."""
    import torch

    from megatron_bloom.generation import load_model

    model = load_model(checkpoint, dtype=profile.pretrain_dtype, attention_impl="sdpa").model.to(device)
    ids = torch.randint(0, VOCAB_SIZE, (profile.micro_batch_size, profile.seq_length), device=device)  # [b, s]
    found = {}
    for mode in ("training", "inference"):
        model.train(mode == "training")
        kind, names = profile_attention(model, ids, device)
        if kind is None:
            raise StepFailed(f"the profiled {mode} forward ran no scaled_dot_product_attention")
        found[mode] = f"{kind} ({', '.join(names)})"
        print(f"  {mode}: {found[mode]}")
    return found


# ---- the steps ------------------------------------------------------------------------------------


def make_data(smoke: Smoke, paths: Dict[str, str], profile: Profile) -> List[dict]:
    from data_tools.make_tasks import read_tasks

    py = sys.executable
    smoke.run([py, "data_tools/make_tasks.py", "--output", paths["tasks"], "--tasks", "copy", "translate",
               "--max-words", "2", "--num-train", "400", "--num-heldout", "20", "--corpus", paths["corpus"],
               "--corpus-lines", str(profile.corpus_lines), "--seed", "0"], "make_tasks")
    smoke.run([py, "data_tools/train_tokenizer.py", "--input", paths["corpus"], "--vocab-size", str(VOCAB_SIZE),
               "--output-dir", paths["tokenizer"]], "train_tokenizer")
    smoke.run([py, "data_tools/preprocess_data.py", "--input", paths["corpus"], "--output-prefix", paths["prefix"],
               "--tokenizer-name-or-path", paths["tokenizer"], "--append-eod", "--workers", "1", "--quiet"],
              "preprocess_data")
    smoke.run([py, "data_tools/preprocess_xp3.py", "--input", os.path.join(paths["tasks"], "train"),
               "--output-prefix", os.path.join(paths["xp3"], "train"), "--tokenizer-name-or-path",
               paths["tokenizer"], "--prepend-space", "--split-by", "language"], "preprocess_xp3")
    # Held-out text for the perplexity step: the corpus' last lines (the training split is 98%).
    with open(paths["corpus"], encoding="utf-8") as fh:
        lines = fh.readlines()
    with open(paths["eval"], "w", encoding="utf-8") as fh:
        fh.writelines(lines[-16:])
    heldout = read_tasks(os.path.join(paths["tasks"], "heldout"))
    if len({r["inputs"] for r in heldout}) < 2:
        raise StepFailed(f"make_tasks wrote {len(heldout)} held-out prompts, fewer than 2 different ones")
    print(f"  corpus {len(lines)} lines, {len(heldout)} held-out prompts, tokenizer of {VOCAB_SIZE} tokens")
    return heldout


def model_flags(profile: Profile) -> List[str]:
    return ["--num-layers", str(profile.num_layers), "--hidden-size", str(profile.hidden_size),
            "--num-attention-heads", str(profile.num_attention_heads), "--seq-length", str(profile.seq_length),
            "--micro-batch-size", str(profile.micro_batch_size), "--global-batch-size", str(profile.global_batch_size),
            "--attention-impl", "sdpa", "--zero-stage", "1", "--distributed-backend", profile.backend,
            "--log-interval", "1"]


def pretrain_command(paths: Dict[str, str], profile: Profile, steps: int, save: str, tb: str,
                     lr: float = 3e-3) -> List[str]:
    return [sys.executable, "launch/pretrain.py", *model_flags(profile), *DTYPE_FLAGS[profile.pretrain_dtype],
            "--vocab-size", str(VOCAB_SIZE), "--init-method-std", "0.02", "--seed", "1",
            "--train-iters", str(steps), "--lr", str(lr), "--min-lr", "3e-4", "--lr-warmup-iters", "2",
            "--lr-decay-style", "cosine", "--clip-grad", "1.0",
            "--data-path", paths["prefix"] + "_text_document", "--tokenizer-name-or-path", paths["tokenizer"],
            "--split", "98,2,0", "--eval-interval", str(steps // 2), "--eval-iters", "1",
            "--save", save, "--load", save, "--save-interval", str(steps // 2), "--tensorboard-dir", tb]


def check_trained(output: str, steps: int, what: str) -> List[float]:
    """The run logged every step, and its losses are finite; returns them."""
    lines = iteration_lines(output)
    losses = [log_field(line, "lm loss") for line in lines]
    if len(lines) != steps:
        raise StepFailed(f"{what} logged {len(lines)} iterations, expected {steps}", "\n".join(lines[-5:]))
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    if not finite or len(finite) != len([x for x in losses if x is not None]):
        raise StepFailed(f"{what} logged no or non-finite losses: {losses}", "\n".join(lines[-5:]))
    return finite


def compare_logits(checkpoint: str, hf_dir: str, prompt: str, device: str) -> float:
    """Max |logit difference| of our model and transformers' reload of the export, fp32, on ``device``."""
    import torch
    import transformers

    from megatron_bloom.generation import load_model

    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    ours = load_model(checkpoint, dtype="fp32", attention_impl="sdpa").model.to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, s]
    with torch.no_grad():
        expected = hf(ids).logits.float()  # [1, s, V]
        got = ours(ids).float()[..., : expected.shape[-1]]  # [1, s, V] (ours is padded to a multiple)
    diff = (got - expected).abs()
    print(f"  transformers loaded {type(hf).__name__} on {device}; prompt {prompt!r} ({ids.shape[1]} tokens): "
          f"max |logit difference| {diff.max().item():.2e}")
    if not torch.allclose(got, expected, atol=LOGITS_TOLERANCE, rtol=LOGITS_TOLERANCE):
        raise StepFailed(f"transformers' logits differ from ours by up to {diff.max().item():.3g} "
                         f"(tolerance {LOGITS_TOLERANCE} abs + rel)")
    return diff.max().item()


def run_smoke(args, work: str) -> Dict[str, str]:
    profile = PROFILES[args.device]
    n = args.pretrain_steps or profile.pretrain_steps
    m = args.finetune_steps or profile.finetune_steps
    paths = {k: os.path.join(work, k) for k in ("tasks", "tokenizer", "xp3", "straight", "resumed", "finetune",
                                                "hf-export", "tb", "logs")}
    paths.update(corpus=os.path.join(work, "corpus.jsonl"), prefix=os.path.join(work, "corpus"),
                 eval=os.path.join(work, "eval.jsonl"))
    os.makedirs(paths["logs"], exist_ok=True)
    smoke, py, dev = Smoke(args.device, work, args.fail_step), sys.executable, args.device
    precision = {"cuda": f"pretrain {profile.pretrain_dtype}, finetune {profile.finetune_dtype}",
                 "cpu": "CPU rehearsal: fp32 instead of bf16/fp16"}[dev]
    mode = f"{profile.backend}, world size 1, {precision}"
    print(f"gpu-smoke on {dev} ({mode}); h={profile.hidden_size} "
          f"L={profile.num_layers} heads={profile.num_attention_heads} seq={profile.seq_length} "
          f"mbs={profile.micro_batch_size} gbs={profile.global_batch_size}; work dir {work}", flush=True)
    summary: Dict[str, str] = {}
    train: Dict[str, TrainFacts] = {}
    tb_straight, tb_resumed = os.path.join(paths["tb"], "straight"), os.path.join(paths["tb"], "resumed")

    with smoke.step("data", "tasks, corpus, tokenizer, .bin/.idx and paired xP3 datasets"):
        heldout = make_data(smoke, paths, profile)

    with smoke.step("pretrain", f"{n} steps {profile.pretrain_dtype} SDPA ZeRO-1 on {profile.backend}, "
                                f"saving at {n // 2} and {n}"):
        out = smoke.run(pretrain_command(paths, profile, n, paths["straight"], tb_straight), "pretrain")
        losses = check_trained(out, n, "pretraining")
        if not losses[-1] < losses[0]:
            raise StepFailed(f"pretraining loss did not fall in {n} steps: {losses[0]:.4f} -> {losses[-1]:.4f}")
        for tag in (f"global_step{n // 2}", f"global_step{n}"):
            if not os.path.isfile(os.path.join(paths["straight"], tag, "complete")):
                raise StepFailed(f"no complete checkpoint {tag} in {paths['straight']}", out[-3000:])
        train["pretrain"] = TrainFacts(profile.pretrain_dtype, losses, tokens_per_second(out), peak_memory(out))
        print(f"  {train['pretrain'].describe()}")

    with smoke.step("resume", f"from step {n // 2} to {n}; loss curve bitwise equal to the straight run"):
        # A copy of the straight run's checkpoints, rolled back to step n/2 the documented way:
        # `latest` names the checkpoint a run resumes from.
        shutil.copytree(paths["straight"], paths["resumed"])
        shutil.rmtree(os.path.join(paths["resumed"], f"global_step{n}"))
        with open(os.path.join(paths["resumed"], "latest"), "w") as fh:
            fh.write(f"global_step{n // 2}")
        out = smoke.run(pretrain_command(paths, profile, n, paths["resumed"], tb_resumed,
                                         lr=6e-3 if args.break_resume else 3e-3), "resume")
        if "> resumed " not in out or f"at iteration {n // 2}," not in out:
            raise StepFailed(f"the run did not say it resumed at iteration {n // 2}", out[-3000:])
        why = compare_curves(tensorboard_scalars(tb_straight, LOSS_TAG), tensorboard_scalars(tb_resumed, LOSS_TAG),
                             range(n // 2 + 1, n + 1))
        if why:
            raise StepFailed(why, "\n".join(iteration_lines(out)[-5:]))
        summary["resume"] = f"steps {n // 2 + 1}-{n} bitwise equal to the straight run"
        print(f"  {summary['resume']}")

    with smoke.step("finetune", f"{m} steps {profile.finetune_dtype} from the pretrain checkpoint on xP3-style pairs"):
        out = smoke.run([py, "launch/finetune.py", *model_flags(profile), *DTYPE_FLAGS[profile.finetune_dtype],
                         "--pretrained", paths["straight"], "--train-iters", str(m), "--lr", "2e-3", "--seed", "5",
                         "--train-weighted-split-paths-path", os.path.join(paths["xp3"], "train.mixture.txt"),
                         "--save", paths["finetune"], "--load", paths["finetune"],
                         "--tensorboard-dir", os.path.join(paths["tb"], "finetune")], "finetune")
        losses = check_trained(out, m, "finetuning")
        # Per logged interval (one step each here), as Megatron counts them.
        skipped = sum(log_field(line, "number of skipped iterations") or 0 for line in iteration_lines(out))
        if skipped >= m:
            raise StepFailed(f"every one of the {m} finetuning steps was skipped (fp16 overflow)", out[-3000:])
        train["finetune"] = TrainFacts(profile.finetune_dtype, losses, tokens_per_second(out), peak_memory(out),
                                       int(skipped))
        print(f"  {train['finetune'].describe()}")

    with smoke.step("generate", f"launch/generate.py --device {dev} on the finetuned checkpoint"):
        prompts = list(dict.fromkeys(r["inputs"] for r in heldout))[:2]  # two different ones
        cmd = [py, "launch/generate.py", "--load", paths["finetune"], "--tokenizer", paths["tokenizer"], "--device",
               dev, "--dtype", profile.pretrain_dtype, "--greedy", "--max-new-tokens", "8", "--json"]
        for prompt in prompts:
            cmd += ["--prompt", prompt]
        out = smoke.run(cmd, "generate")
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if len(records) != len(prompts):
            raise StepFailed(f"generate.py gave {len(records)} answers for {len(prompts)} prompts", out[-3000:])
        for prompt, r in zip(prompts, records):
            if not 1 <= len(r["generated_ids"]) <= 8 or not all(math.isfinite(x) for x in r["prompt_logprobs"]):
                raise StepFailed(f"generate.py's answer to {prompt!r} is malformed: {r}")
            print(f"  {prompt!r} -> {r['text']!r}")
        summary["generate"] = f"{len(records)} prompts answered"

    with smoke.step("evaluate", f"launch/evaluate.py --device {dev}: perplexity on held-out corpus lines"):
        out = smoke.run([py, "launch/evaluate.py", "--load", paths["finetune"], "--tokenizer", paths["tokenizer"],
                         "--data", paths["eval"], "--task", "ppl", "--device", dev, "--dtype", profile.pretrain_dtype,
                         "--max-length", str(profile.seq_length), "--batch-size", "4", "--json"], "evaluate")
        record = json.loads(out.strip().splitlines()[-1])
        ppl = record["overall"]["ppl"]
        if not (math.isfinite(ppl) and 1.0 <= ppl <= VOCAB_SIZE * 4):
            raise StepFailed(f"perplexity {ppl} is not a plausible value for a {VOCAB_SIZE}-token vocabulary")
        summary["evaluate"] = f"perplexity {ppl:.2f} over {record['overall']['tokens']} tokens"
        print(f"  {summary['evaluate']}")

    with smoke.step("export", "native-to-hf, reloaded with transformers; logits against ours"):
        smoke.run([py, "launch/convert_checkpoint.py", "native-to-hf", "--load", paths["finetune"],
                   "--out", paths["hf-export"], "--tokenizer", paths["tokenizer"]], "export")
        diff = compare_logits(paths["finetune"], paths["hf-export"], heldout[0]["inputs"], dev)
        summary["export"] = f"transformers' logits match ours (max difference {diff:.1e}, fp32)"

    with smoke.step("sdpa", f"which SDPA kernel runs the attention ({profile.pretrain_dtype}, training shape)"):
        kernels = attention_kernels(paths["straight"], profile, dev)
        summary["sdpa"] = f"training {kernels['training']}; inference {kernels['inference']}"

    pre, fine = train["pretrain"], train["finetune"]
    return {
        "SDPA kernel": summary["sdpa"],
        "peak GPU memory": f"pretrain {pre.memory_text()}; finetune {fine.memory_text()}",
        "tokens/s": f"pretrain {pre.tokens_text()} ({pre.dtype}), finetune {fine.tokens_text()} ({fine.dtype})",
        "resume": summary["resume"],
        "losses": (f"pretrain {pre.losses[0]:.3f} -> {pre.losses[-1]:.3f}, finetune {fine.losses[0]:.3f} -> "
                   f"{fine.losses[-1]:.3f} ({fine.skipped} of {m} steps skipped)"),
        "generate": summary["generate"],
        "evaluate": summary["evaluate"],
        "export": summary["export"],
        "wall": f"{time.time() - smoke.started:.0f} s ({mode})",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pretrain_steps is not None and (args.pretrain_steps < 4 or args.pretrain_steps % 2):
        fail(f"--pretrain-steps must be even (it saves and resumes at half) and >= 4 (2 are warmup), "
             f"got {args.pretrain_steps}")
    if args.finetune_steps is not None and args.finetune_steps < 1:
        fail(f"--finetune-steps must be >= 1, got {args.finetune_steps}")
    check_device(args.device)
    temporary = args.work_dir is None
    work = tempfile.mkdtemp(prefix="gpu-smoke-") if temporary else os.path.abspath(args.work_dir)
    if not temporary:
        os.makedirs(work, exist_ok=True)
        if os.listdir(work):
            fail(f"--work-dir {work} is not empty; pass a new or empty folder")
    summary = run_smoke(args, work)
    wall = summary.pop("wall")
    print(f"\ngpu-smoke passed on {args.device} in {wall}:")
    for key, text in summary.items():
        print(f"  {key:<16} {text}")
    if temporary:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
