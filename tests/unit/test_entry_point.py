"""Entry points: an impossible layout fails in the first lines of training (one line, exit 2); every
launch/*.py has one shape, every command has a megatron-bloom-<command> console script, and no
file edits sys.path."""
import ast
import importlib
import os
import subprocess
import sys
import time

import pytest


def run_pretrain(repo_root, args, world_size):
    env = dict(os.environ, RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_PORT="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, os.path.join(repo_root, "launch", "pretrain.py"), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )
    return proc, time.monotonic() - start


@pytest.mark.parametrize(
    "args, world, message",
    [
        (["--num-attention-heads", "4", "--tensor-model-parallel-size", "3", "--train-iters", "5"], 3,
         "error: num_attention_heads=4 is not divisible by tensor_model_parallel_size=3; use 1, 2 or 4"),
        (["--num-layrs", "4"], 1, "error: unknown argument '--num-layrs'; did you mean '--num-layers'?"),
    ],
)
def test_bad_layout_fails_fast_without_traceback(repo_root, args, world, message):
    proc, seconds = run_pretrain(repo_root, args, world)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == message
    assert "Traceback" not in proc.stderr + proc.stdout
    assert seconds < 20  # python + config import only; no process group, no torch.distributed init


# --- the shape of the entry points --------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIPPED_DIRS = {".git", ".venv", "build", "dist", "demo_out", "__pycache__"}


def _parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _console_scripts():
    """{name: "module:callable"} from setup.py's entry_points, read without running setup()."""
    for node in ast.walk(_parse(os.path.join(REPO, "setup.py"))):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return dict(item.value.split("=", 1) for item in value.elts)
    raise AssertionError("setup.py has no console_scripts")


def _launch_target(path):
    """``module:name`` a launch/*.py imports as ``main``, after checking the file's whole shape:
    docstring with its usage, one import of the entry point from the package, the __main__ guard."""
    body = _parse(path).body
    script = "launch/" + os.path.basename(path)
    assert len(body) == 3, f"{script}: docstring, one import, the __main__ guard; found {len(body)} statements"
    doc, imp, guard = body
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str), \
        f"{script} starts with its docstring"
    assert script in doc.value.value, f"{script}'s docstring shows its usage ({script} ...)"
    assert isinstance(imp, ast.ImportFrom) and imp.module.startswith("megatron_bloom.") and len(imp.names) == 1, \
        f"{script} imports its entry point from the package"
    alias = imp.names[0]
    assert (alias.asname or alias.name) == "main", f"{script} imports its entry point as main"
    assert ast.unparse(guard) == "if __name__ == '__main__':\n    main()", f"{script} ends with the __main__ guard"
    return f"{imp.module}:{alias.name}"


def test_every_launch_script_is_docstring_import_main():
    scripts = sorted(f for f in os.listdir(os.path.join(REPO, "launch")) if f.endswith(".py"))
    assert "pretrain.py" in scripts
    for name in scripts:
        _launch_target(os.path.join(REPO, "launch", name))


def test_no_python_file_touches_sys_path():
    offenders = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                for node in ast.walk(_parse(path)):
                    if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                            and node.value.id == "sys"):
                        offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert offenders == [], "sys.path is set by the editable install and pytest.ini's pythonpath, not by code"


def test_console_scripts_point_at_callables():
    scripts = _console_scripts()
    for name, target in scripts.items():
        assert name.startswith("megatron-bloom-"), f"{name}: console scripts are named megatron-bloom-<command>"
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{name}={target} is not a callable"
    for kept in ("megatron-bloom-pretrain", "megatron-bloom-evaluate", "megatron-bloom-lm-eval"):
        assert kept in scripts


def test_every_command_has_a_console_script():
    targets = set(_console_scripts().values())
    for name in sorted(os.listdir(os.path.join(REPO, "launch"))):
        if name.endswith(".py"):
            target = _launch_target(os.path.join(REPO, "launch", name))
            assert target in targets, f"launch/{name} ({target}) has no megatron-bloom-<command> console script"
    for name in sorted(os.listdir(os.path.join(REPO, "data_tools"))):
        if name.endswith(".py") and name != "__init__.py":
            tree = _parse(os.path.join(REPO, "data_tools", name))
            if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
                target = f"data_tools.{name[:-3]}:main"
                assert target in targets, f"data_tools/{name} has a main but no console script"
