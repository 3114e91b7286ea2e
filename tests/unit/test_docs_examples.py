"""The commands shown in README.md, docs/*.md and slurm/README.md, run as written.

Every command line of a ```bash / ```sh / ```console block, and every `$ ` line of any block, is
extracted from the Markdown (backslash continuations joined, a trailing `# comment` dropped) and
must be in ``COMMANDS``: ``RUN`` executes it with bash, word for word, in a temporary folder that
holds what the docs assume is already there (a corpus, a tokenizer, `data/` prefixes, a
transformers folder `bloom-560m/`, a native `runs/ckpt`, an `export/`, a Megatron-DeepSpeed
`bloom-optimizer-states/`, all tiny) plus links to the repository's `launch/`, `data_tools/`,
`configs/`, `benchmarks/` and `slurm/`; ``python`` is this interpreter. Output the docs show under
a `$ ` line must appear in what it prints. ``SKIP`` says why a command cannot run here.

A command added to the docs, or an edited one, fails ``test_every_command_is_classified`` until
it is classified here; an entry whose command left the docs fails ``test_no_stale_entries``.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md", *sorted(f"docs/{n}" for n in os.listdir(os.path.join(REPO_ROOT, "docs")) if n.endswith(".md")),
        "slurm/README.md"]
SHELL_BLOCKS = ("bash", "sh", "console")


def extract(text):
    """[(command, shown output lines)] of one Markdown file, in order."""
    found, lang, block = [], None, None
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            if block is None:
                lang, block = fence.group(1), []
            else:
                found += _commands(lang, block)
                block = None
        elif block is not None:
            block.append(line)
    return found


def _commands(lang, lines):
    """In a block with `$ ` lines, those are the commands and the lines below each its shown output;
    otherwise every line of a bash/sh block that is not blank or a comment is a command."""
    lines = [line.strip() for line in lines]  # blocks may be indented under a list item
    prompts = any(line.startswith("$ ") for line in lines)
    if not prompts and lang not in SHELL_BLOCKS:
        return []
    out, pending = [], None
    for line in lines:
        if pending is not None:
            line = pending + " " + line
        elif prompts and line.startswith("$ "):
            line = line[2:]
        elif prompts or not line or line.startswith("#"):
            if prompts and out and line:
                out[-1][1].append(line)
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = None
        out.append((re.sub(r"\s+#\s.*$", "", line).strip(), []))
    return out


def doc_commands():
    """{command: (doc file, shown output lines)}."""
    found = {}
    for name in DOCS:
        with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as fh:
            for command, shown in extract(fh.read()):
                found.setdefault(command, (name, shown))
    return found


RUN = "run"
GPU_SMOKE = "covered by tests/training/test_gpu_smoke.py, which runs benchmarks/gpu_smoke.py --device cpu (80 s)"

BAD_INPUTS = ("tests/reliability/test_bad_inputs.py runs it on each bad input of the table below it; on good input "
              "it is the README's run of the same command without --tokenizer (the checkpoint carries one), "
              "which runs here")

# command -> RUN (kind of workdir, expected exit code) or a reason not to run it.
COMMANDS = {
    # README.md
    "make demo": "runs for minutes (pretraining and finetuning with torchrun); tests/unit/test_demo.py covers launch/demo.py",
    "make test": "is the test suite this test is part of",
    "WORLD_SIZE=3 python launch/pretrain.py --num-attention-heads 4 --tensor-model-parallel-size 3 --train-iters 10":
        (RUN, "empty", 2),
    "python data_tools/train_tokenizer.py --input corpus.jsonl --vocab-size 50000 --output-dir tok": (RUN, "data", 0),
    "python data_tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus "
    "--tokenizer-name-or-path tok --json-keys text --append-eod --workers 8": (RUN, "data", 0),
    "python data_tools/inspect_data.py --data-prefix data/corpus_text_document --tokenizer-name-or-path tok --count 2":
        (RUN, "data", 0),
    "python data_tools/merge_datasets.py --input data/shard0_text_document data/shard1_text_document "
    "--output-prefix data/all": (RUN, "data", 0),
    "python data_tools/language_weights.py data/en_text_document data/fr_text_document --alpha 0.3": (RUN, "data", 0),
    "torchrun --nproc-per-node 4 launch/pretrain.py --config configs/demo.yaml --data-path data/corpus_text_document "
    "--tokenizer-name-or-path tok --save runs/ckpt --load runs/ckpt --tensorboard-dir runs/tb --train-iters 1000":
        "trains for minutes on 4 processes; tests/training/test_pretrain.py runs pretraining with torchrun",
    "python launch/convert_checkpoint.py hf-to-native --hf bloom-560m/ --out ckpt/": (RUN, "data", 0),
    "python launch/convert_checkpoint.py native-to-hf --load runs/ckpt --out export/": (RUN, "data", 0),
    "python launch/convert_checkpoint.py megatron-deepspeed-to-hf --load bloom-optimizer-states/ --out export/":
        (RUN, "data", 0),
    "python launch/generate.py --load export/ --prompt \"Translate to English: Je t'aime.\" --max-new-tokens 20":
        (RUN, "data", 0),
    "python data_tools/make_tasks.py --output tasks/": (RUN, "empty", 0),
    "python data_tools/preprocess_xp3.py --input xp3/ --output-prefix data/xp3 --tokenizer-name-or-path tok "
    "--prepend-space --split-by language": (RUN, "data", 0),
    "torchrun --nproc-per-node 8 launch/finetune.py --config configs/bloomz-7b1.yaml --pretrained bloom-7b1/ "
    "--data-path ... --save runs/ft --load runs/ft --norm-target-loss":
        "BLOOMZ-7b1 on 8 GPUs, `--data-path ...` is a placeholder; tests/recipes/test_published_runs.py runs "
        "BLOOMZ-7b1's flags at toy sizes",
    "python launch/plan.py --nodes 48 --gpus-per-node 8 --gpu a100-80g --model-name bloom-176b "
    "--tensor-model-parallel-size 4 --pipeline-model-parallel-size 12 --micro-batch-size 2 --global-batch-size 2048 "
    "--rampup-batch-size 192 16 9765625 --train-samples 220000000 --bf16 --zero-stage 0 --checkpoint-activations":
        (RUN, "empty", 0),
    "python launch/plan.py --nodes 8 --gpus-per-node 8 --model-name bloom-7b1 --global-batch-size 512 --fp16 --search":
        (RUN, "empty", 0),
    "python launch/plan.py --nodes 8 --gpus-per-node 8 --finetune --config configs/bloomz-7b1.yaml": (RUN, "empty", 0),
    "sbatch slurm/bloom-176b.slurm": "needs sbatch on a 48-node GPU cluster; tests/slurm/test_slurm.py runs the "
                                     "tiny CPU recipe on a local SLURM",
    "python launch/evaluate.py --load runs/ckpt --data flores.jsonl --language-key language --metric ppl,byte_ppl":
        (RUN, "data", 0),
    "python launch/evaluate.py --load export/ --task mc --data copa.jsonl": (RUN, "data", 0),
    "python launch/lm_eval_harness.py --model megatron_bloom --model_args load=runs/ckpt --tasks TASK "
    "--include_path DIR": "TASK and DIR are placeholders (an lm-eval task folder); tests/eval/test_eval_lm_eval.py runs "
                          "launch/lm_eval_harness.py on a local task",
    # docs/bad-inputs.md: the commands whose refusals the tables list (tests/reliability/test_bad_inputs.py)
    "python data_tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --tokenizer-name-or-path tok":
        (RUN, "data", 0),
    "python launch/pretrain.py --config configs/demo.yaml --tensor-model-parallel-size 1 "
    "--pipeline-model-parallel-size 1 --data-path data/corpus_text_document --save runs/ckpt "
    "--load runs/ckpt --train-iters 1000": (RUN, "empty", 2),  # see SHOWN_IN_PROSE
    "python launch/convert_checkpoint.py native-to-hf --load runs/ckpt --out export/ --tokenizer tok": BAD_INPUTS,
    "python launch/evaluate.py --load runs/ckpt --data docs.jsonl --tokenizer tok": BAD_INPUTS,
    # docs/gpu-smoke.md
    "make gpu-smoke": "needs an NVIDIA GPU (and make builds .venv); without one it prints the error line "
                      "docs/gpu-smoke.md shows, checked by test_gpu_smoke_without_gpu below",
    "make gpu-smoke GPU_SMOKE_ARGS=\"--device cpu\"": GPU_SMOKE,
    "python benchmarks/gpu_smoke.py --help": (RUN, "empty", 0),
    "python benchmarks/gpu_smoke.py --device cpu": GPU_SMOKE,
    # slurm/README.md
    "INPUTS=\"en=raw/en fr=raw/fr code=raw/code\" TOKENIZER=tok OUT_DIR=data/roots FILES_PER_TASK=4 "
    "PYTHON=.venv/bin/python bash slurm/preprocess.slurm":
        "submits SLURM jobs with sbatch; tests/slurm/test_corpus_slurm.py runs it on a local SLURM",
}

# Output the docs show in prose rather than under a `$ ` line: docs/bad-inputs.md's pretrain command,
# run where there is no data, prints its table's first row.
SHOWN_IN_PROSE = {
    "python launch/pretrain.py --config configs/demo.yaml --tensor-model-parallel-size 1 "
    "--pipeline-model-parallel-size 1 --data-path data/corpus_text_document --save runs/ckpt "
    "--load runs/ckpt --train-iters 1000":
        ("docs/bad-inputs.md", "`error: --data-path: data/corpus_text_document.idx: file not found; pass the prefix "
                               "without .bin/.idx and run data_tools/preprocess_data.py to create it`"),
}

LINKED = ("launch", "data_tools", "configs", "benchmarks", "slurm")
TEXTS = [{"text": s} for s in (
    "The quick brown fox jumps over the lazy dog.",
    "BLOOM is a multilingual language model trained on many languages.",
    "La capitale de la France est Paris, et celle de l'Italie est Rome.",
    "Tensor parallelism splits every weight matrix across ranks.",
)] * 5


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def _empty_workdir(path):
    os.makedirs(path)
    for name in LINKED:
        os.symlink(os.path.join(REPO_ROOT, name), os.path.join(path, name))
    return path


def _in_process(main, argv):
    try:
        main(argv)
    except SystemExit as stop:  # entry points exit with their code
        assert not stop.code, f"{argv}: exit code {stop.code}"


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory):
    """What the docs' commands expect to find: corpus.jsonl, tok/, data/*_text_document, bloom-560m/
    (a transformers folder), runs/ckpt (native), export/, bloom-optimizer-states/, xp3/, eval rows."""
    from interop_helpers import save_tokenizer, tiny_hf_model
    from test_interop_megatron_deepspeed import write_original

    from megatron_bloom.commands.convert_checkpoint import main as convert
    from data_tools.preprocess_data import main as preprocess

    work = _empty_workdir(str(tmp_path_factory.mktemp("docs") / "base"))
    here = os.getcwd()
    os.chdir(work)
    try:
        _write_jsonl("corpus.jsonl", TEXTS)
        vocab = save_tokenizer("tok", vocab_size=256)
        _in_process(preprocess, ["--input", "corpus.jsonl", "--output-prefix", "data/corpus", "--tokenizer-name-or-path", "tok",
                    "--append-eod", "--workers", "1"])
        for copy in ("shard0", "shard1", "en", "fr"):
            for ext in os.listdir("data"):
                if ext.startswith("corpus_text_document"):
                    shutil.copy(f"data/{ext}", f"data/{ext.replace('corpus', copy)}")
        hf = tiny_hf_model(vocab_size=max(vocab, 256), hidden_size=32, n_head=4, n_layer=2)
        hf.save_pretrained("bloom-560m")
        for name in os.listdir("tok"):
            shutil.copy(os.path.join("tok", name), "bloom-560m")
        shutil.copytree("bloom-560m", "export")
        _in_process(convert, ["hf-to-native", "--hf", "bloom-560m", "--out", "runs/ckpt"])
        write_original(hf, "bloom-optimizer-states", tp=2)
        for lang in ("en", "fr"):
            _write_jsonl(f"xp3/{lang}/train.jsonl", [{"inputs": "Copy: " + r["text"], "targets": r["text"]}
                                                     for r in TEXTS[:4]])
        _write_jsonl("flores.jsonl", [dict(r, language=lang) for r, lang in zip(TEXTS[:4], ["en", "en", "fr", "en"])])
        _write_jsonl("copa.jsonl", [{"context": "The fox", "choices": [" jumps.", " sleeps."], "label": 0}] * 2)
        _write_jsonl("docs.jsonl", TEXTS[:3])
    finally:
        os.chdir(here)
    return work


def run_as_written(command, cwd):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_every_command_is_classified():
    unknown = [f"{doc}: {command}" for command, (doc, _) in doc_commands().items() if command not in COMMANDS]
    assert not unknown, ("commands in the docs that tests/unit/test_docs_examples.py does not classify (add each to "
                         "COMMANDS as RUN or with the reason it cannot run):\n" + "\n".join(unknown))


def test_no_stale_entries():
    found = doc_commands()
    stale = [c for c in [*COMMANDS, *SHOWN_IN_PROSE] if c not in found]
    assert not stale, "COMMANDS entries no longer in the docs:\n" + "\n".join(stale)
    for command, (doc, shown) in SHOWN_IN_PROSE.items():
        with open(os.path.join(REPO_ROOT, doc), encoding="utf-8") as fh:
            assert shown in fh.read(), f"{doc} no longer shows {shown}"


RUNS = [c for c, how in COMMANDS.items() if isinstance(how, tuple)]


def test_skip_reasons_name_tests_that_exist():
    named = {p for how in COMMANDS.values() if isinstance(how, str) for p in re.findall(r"tests/[\w/]+(?:\.py)?", how)}
    missing = sorted(p for p in named if not os.path.exists(os.path.join(REPO_ROOT, p)))
    assert not missing, f"SKIP reasons name tests that do not exist: {missing}"


@pytest.mark.parametrize("command", RUNS, ids=[f"{i}-{re.sub(r'[^a-z0-9_]+', '-', c.split('.py')[0].split('/')[-1])}"
                                               for i, c in enumerate(RUNS)])
def test_command_runs_as_documented(command, data_workdir, tmp_path):
    _, kind, code = COMMANDS[command]
    found = doc_commands()
    if command not in found:
        pytest.fail(f"not in the docs any more: {command}")
    doc, shown = found[command]
    cwd = str(tmp_path / "work")
    if kind == "data":
        shutil.copytree(data_workdir, cwd, symlinks=True)
    else:
        _empty_workdir(cwd)
    proc = run_as_written(command, cwd)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == code, f"{doc}: `{command}` exited {proc.returncode}, not {code}:\n{printed[-3000:]}"
    if code == 0:
        assert "error:" not in proc.stderr, printed[-3000:]
    for line in shown:
        assert line.strip() in printed, f"{doc} shows `{line.strip()}` for `{command}`; it printed:\n{printed[-3000:]}"
    if command in SHOWN_IN_PROSE:
        line = SHOWN_IN_PROSE[command][1].strip("`")
        assert line in printed, f"{doc} shows `{line}` for `{command}`; it printed:\n{printed[-3000:]}"


def test_gpu_smoke_without_gpu(tmp_path):
    """docs/gpu-smoke.md: `make gpu-smoke` (= python benchmarks/gpu_smoke.py) without a GPU prints the
    line it shows and exits 2. The script is run directly: the make target would build .venv first."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with open(os.path.join(REPO_ROOT, "docs/gpu-smoke.md"), encoding="utf-8") as fh:
        shown = [line for line in fh.read().splitlines() if line.startswith("error: gpu-smoke needs an NVIDIA GPU")]
    assert len(shown) == 1, "docs/gpu-smoke.md no longer shows the no-GPU line"
    if f"torch {torch.__version__} " not in shown[0]:
        shown = [shown[0].split(";")[0]]  # the rest names the torch build the docs were written on
    proc = run_as_written("python benchmarks/gpu_smoke.py", _empty_workdir(str(tmp_path / "work")))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert shown[0] in proc.stderr, f"docs/gpu-smoke.md shows `{shown[0]}`; it printed:\n{proc.stderr[-2000:]}"
