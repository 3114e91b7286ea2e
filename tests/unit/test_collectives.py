"""Device discipline of every collective (distributed/collectives.py), checked on CPU.

On GPU the default group is NCCL, which takes CUDA tensors only; on CPU it is gloo with CPU tensors
everywhere, so a collective handed a CPU tensor on a GPU run is invisible here unless checked:

* the source: no module but ``distributed/collectives.py`` touches ``torch.distributed``'s
  collectives (a call, or a reference such as ``barrier=dist.barrier``);
* the helpers: values go in as numbers and tensors are built on the group's device; a tensor on
  another device is refused (the ``meta`` device stands in for "not the group's" on CPU);
* work that outlasts the collective timeout (a conversion on rank 0) is waited for on files.
"""
import ast
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from megatron_bloom.testing.multiprocess import run_distributed

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_bloom"
HOME = PACKAGE / "distributed" / "collectives.py"

COLLECTIVES = {
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "barrier", "monitored_barrier", "gather", "scatter", "reduce", "all_to_all", "all_to_all_single", "send",
    "recv", "isend", "irecv", "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
}


def _is_torch_distributed(node: ast.AST, aliases: set) -> bool:
    if isinstance(node, ast.Name):
        return node.id in aliases
    return (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
            and node.value.id == "torch")


def direct_collectives(path: Path, root: Path = PACKAGE.parent) -> list:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names if a.name == "torch.distributed" and a.asname}
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and n.module == "torch.distributed" for a in n.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and _is_torch_distributed(node.value, aliases):
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.attr}")
        elif isinstance(node, ast.Name) and node.id in imported:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.id}")
    return found


def test_only_the_helpers_call_torch_distributed_collectives():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != HOME for hit in direct_collectives(path)]
    assert not found, "collectives outside distributed/collectives.py (use its helpers):\n" + "\n".join(found)


def test_the_source_check_finds_a_planted_collective(tmp_path):
    """The check itself: the bugs it exists for, written the ways they were written."""
    planted = tmp_path / "megatron_bloom" / "planted.py"
    planted.parent.mkdir()
    planted.write_text("import torch\nimport torch.distributed as dist\nfrom torch.distributed import barrier\n"
                       "def f(x):\n    flag = torch.tensor([1.0])\n    dist.broadcast(flag, src=0)\n"
                       "    torch.distributed.all_gather([x], x)\n    hook = dist.barrier\n    barrier()\n")
    hits = [h.split()[-1] for h in direct_collectives(planted, tmp_path)]
    assert hits.count("broadcast") == 1 and hits.count("all_gather") == 1 and hits.count("barrier") == 2, hits


def test_group_device_follows_the_backend(monkeypatch):
    from megatron_bloom.distributed import collectives
    from megatron_bloom.distributed.init import run_device

    assert run_device("gloo", 3) == torch.device("cpu")
    assert run_device("nccl", 3) == torch.device("cuda", 3)
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
    if torch.accelerator.current_accelerator() is None:
        with pytest.raises(collectives.DeviceMismatch, match="needs an accelerator"):
            collectives.group_device()
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "gloo")
    assert collectives.group_device() == torch.device("cpu")


def _helpers():
    import torch.distributed as dist

    from megatron_bloom.distributed import collectives as c

    rank = dist.get_rank()
    out = {
        "sum": c.all_reduce_values([rank, 1.5]),
        "max": c.all_reduce_values([rank], op="max"),
        "broadcast": c.broadcast_values([10 + rank, True], src=1),
        "gathered": c.all_gather_values([rank, rank * 2]),
        "objects": c.all_gather_object({"rank": rank}),
        "object": c.broadcast_object("from 0" if rank == 0 else None),
    }
    try:
        c.all_reduce_(torch.ones(2, device="meta"))
    except c.DeviceMismatch as exc:
        out["refused"] = str(exc)
    c.barrier()
    return out


@pytest.mark.distributed
def test_value_helpers_and_the_device_check():
    for rank, out in enumerate(run_distributed(_helpers, 2, timeout=60)):
        assert out["sum"] == [1.0, 3.0] and out["max"] == [1.0]
        assert out["broadcast"] == [11.0, 1.0] and out["gathered"] == [[0.0, 0.0], [1.0, 2.0]]
        assert out["objects"] == [{"rank": 0}, {"rank": 1}] and out["object"] == "from 0"
        assert out["refused"].startswith("all_reduce: a tensor on meta, but the 'gloo' group works on cpu"), out


def _slow_work_on_rank0(folder: str, seconds: float, fail: bool, failure_file: str = "failed"):
    import torch.distributed as dist

    from megatron_bloom.distributed.collectives import all_reduce_values, on_rank0_while_others_poll
    from megatron_bloom.errors import UserError

    # The default group gives up on any collective after 5 s, less than the work takes.
    dist.init_process_group("gloo", timeout=timedelta(seconds=5))
    done_file = os.path.join(folder, "done")

    def work():
        time.sleep(seconds)
        if fail:
            raise UserError("the source is unreadable")
        open(done_file, "w").close()

    try:
        on_rank0_while_others_poll(work, lambda: os.path.exists(done_file), os.path.join(folder, failure_file),
                                   what="converting", poll_seconds=0.2)
    except UserError as exc:
        return str(exc)
    return all_reduce_values([1.0])[0]  # the group is still alive afterwards


@pytest.mark.distributed
@pytest.mark.slow
def test_work_on_rank0_outlasts_the_collective_timeout(tmp_path):
    (tmp_path / "ok").mkdir()
    assert run_distributed(_slow_work_on_rank0, 2, str(tmp_path / "ok"), 8.0, False, init=False, timeout=60) == [2.0, 2.0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("failure_file", ["failed", "universal/failed"])  # its folder may not exist yet
def test_a_failure_on_rank0_reaches_the_waiting_ranks(tmp_path, failure_file):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "failed.stale").write_text("an earlier job's failure")  # never taken for this one
    out = run_distributed(_slow_work_on_rank0, 2, str(tmp_path / "f"), 1.0, True, failure_file, init=False, timeout=60)
    assert out == ["the source is unreadable", "converting failed on rank 0: the source is unreadable"]


def _calls_inside(tree: ast.AST, outer: str, inner: str) -> int:
    """How many calls to ``inner`` sit inside an argument of a call to ``outer`` (a lambda or a
    nested function passed by name counts too)."""
    local_functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}

    def name(call: ast.Call) -> str:
        return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")

    found = 0
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and name(n) == outer):
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            body = local_functions.get(arg.id) if isinstance(arg, ast.Name) else arg
            found += sum(1 for n in ast.walk(body or arg) if isinstance(n, ast.Call) and name(n) == inner)
    return found


@pytest.mark.parametrize("module, work", [("training/pretrain.py", "convert_to_universal"),
                                          ("checkpoint/pretrained.py", "write")])
def test_conversions_on_rank0_are_waited_for_on_files(module, work):
    """A barrier (or any collective) around a conversion gives up after the group's timeout, which
    converting BLOOM-176B's 2.3 TB outlasts: rank 0 converts inside on_rank0_while_others_poll."""
    tree = ast.parse((PACKAGE / module).read_text())
    assert _calls_inside(tree, "on_rank0_while_others_poll", work) >= 1
    total = sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == work)
    assert total == _calls_inside(tree, "on_rank0_while_others_poll", work), f"{work} called outside the wait"
