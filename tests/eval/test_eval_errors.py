"""Bad input to evaluate.py / lm_eval_harness.py: one ``error: ...`` line naming the problem, exit code 2."""
import glob
import os
import shutil

import pytest

from eval_helpers import run_launch, write_jsonl
from megatron_bloom.cli import entry_point
from megatron_bloom.evaluation.cli import main

GOOD_MC = {"context": "One two", "choices": [" three", " four"], "label": 0}


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        entry_point(main)([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.mark.parametrize("rows, task, message", [
    ([{"text": "fine"}, {"body": "no text"}], "ppl", ":2: no 'text' key (keys: body); name the right one with --text-key"),
    ([{"text": 3}], "ppl", ":1: 'text' must be a string, got int"),
    (['{"text": "a",'], "ppl", ":1: not valid JSON (Expecting property name enclosed in double quotes at column"),
    (['{"text": "tab\tinside"}'], "ppl", ":1: not valid JSON (Invalid control character at column 14)"),
    (["[1, 2]"], "ppl", ":1: a line must hold a JSON object, got list"),
    ([], "ppl", " holds no rows (empty file)"),
    (["", "  "], "mc", " holds no rows (empty file)"),
    ([GOOD_MC, {**GOOD_MC, "label": 2}], "mc", ":2: 'label' is 2 but there are 2 choices (valid: 0..1)"),
    ([{**GOOD_MC, "label": -1}], "mc", ":1: 'label' is -1 but there are 2 choices"),
    ([{**GOOD_MC, "label": "0"}], "mc", ":1: 'label' must be an integer index into 'choices', got '0'"),
    ([{"context": "x", "choices": [" a"], "label": 0}], "mc", ":1: 'choices' must be a list of at least 2 strings"),
    ([{"context": "x", "choices": [" a", ""], "label": 0}], "mc", ":1: choices[1] must be a non-empty string"),
    ([{"choices": [" a", " b"], "label": 0}], "mc", ":1: no 'context' key (keys: choices, label)"),
    ([{**GOOD_MC, "language": 5}], "mc", ":1: 'language' must be a string, got int"),
])
def test_bad_data(tiny, tmp_path, capsys, rows, task, message):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    code, err = _run(capsys, "--load", tiny["hf"], "--data", data, "--task", task)
    assert code == 2
    assert err == f"error: {data}{message}" or (err.startswith(f"error: {data}{message}") and "\n" not in err)


def _corrupt_native(tiny, tmp_path):
    broken = tmp_path / "native_truncated"
    shutil.copytree(tiny["native"], broken)
    layer = sorted(glob.glob(str(broken / "global_step*" / "layer_03-model_01-model_states.pt")))[0]
    with open(layer, "r+b") as fh:
        fh.truncate(100)
    return broken


def _hf_without_tokenizer(tiny, tmp_path):
    bare = tmp_path / "hf_bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny["hf"] / name, bare / name)
    return bare


def _bad_config(tiny, tmp_path):
    folder = tmp_path / "hf_bad_config"
    shutil.copytree(tiny["hf"], folder)
    (folder / "config.json").write_text("{not json")
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda tiny, tmp: tmp / "missing", "does not exist"),
    (lambda tiny, tmp: tmp, "has no 'latest' file and no layer files: not a native checkpoint"),
    (_bad_config, "config.json is not valid JSON"),
    (_corrupt_native, "layer_03-model_01-model_states.pt"),
    (_hf_without_tokenizer, "has no tokenizer files; pass the tokenizer folder"),
])
def test_checkpoint_that_does_not_load(tiny, tmp_path, capsys, make, message):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello"}])
    load = make(tiny, tmp_path)
    code, err = _run(capsys, "--load", load, "--data", data)
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert message in err


@pytest.mark.parametrize("args, message", [
    (["--metric", "ppl,acc"], "--metric 'ppl,acc': choose from ppl, byte_ppl, bits_per_byte, token_nll"),
    (["--max-length", "8", "--stride", "9"], "--stride must be in [1, --max-length=8], got 9"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--task", "nope"], "argument --task: invalid choice: 'nope'"),
])
def test_bad_flags(tiny, tmp_path, capsys, args, message):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello"}])
    code, err = _run(capsys, "--load", tiny["hf"], "--data", data, *args)
    assert code == 2 and "\n" not in err and message in err


def test_scripts_exit_2_without_traceback(tiny, tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", [{**GOOD_MC, "label": 5}])
    proc = run_launch("evaluate.py", "--load", tiny["hf"], "--data", data, "--task", "mc")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {data}:1: 'label' is 5 but there are 2 choices (valid: 0..1)"


def test_lm_eval_wrapper_reports_a_bad_checkpoint_in_one_line(tmp_path):
    pytest.importorskip("lm_eval")
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello"}])
    (tmp_path / "roll.yaml").write_text(
        f"task: tiny_roll_err\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: byte_perplexity\n")
    proc = run_launch("lm_eval_harness.py", "--model", "megatron_bloom", "--model_args", f"load={tmp_path / 'nothing'}",
                      "--tasks", "tiny_roll_err", "--include_path", tmp_path, "--device", "cpu")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: --load {tmp_path / 'nothing'} does not exist"
