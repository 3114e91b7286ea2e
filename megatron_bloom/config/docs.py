"""Field docstrings of the config dataclasses, read from source with ``ast``.

Python drops a string literal placed under a dataclass field at run time; the source keeps it.
Reading it back lets ``--help`` and the README's configuration reference use the same text.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Dict


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """Map each field of dataclass ``cls`` to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: Dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def markdown_reference() -> str:
    """The configuration reference as a markdown table per section (for the README)."""
    from .schema import FLAG_ALIASES, SECTIONS

    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"### `{section}`\n")
        lines.append("| YAML key / flag | default | meaning |")
        lines.append("|---|---|---|")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            flags = ["--" + f.name.replace("_", "-"), *FLAG_ALIASES.get(f.name, ())]
            if f.type in (bool, "bool") and not f.name.startswith("no_"):
                flags.append("--no-" + f.name.replace("_", "-"))
            shown = " / ".join(f"`{flag}`" for flag in flags)
            lines.append(f"| `{f.name}` / {shown} | `{default}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """``python -m megatron_bloom.config.docs > docs/configuration.md``"""
    print("# Configuration reference\n")
    print("Generated from the docstrings under each field of `megatron_bloom/config/schema.py`")
    print("(`python -m megatron_bloom.config.docs > docs/configuration.md`). Every key can be set in a")
    print("YAML file under its section (`--config FILE`) or with the flag; flags win (`--no-FLAG` turns a")
    print("switch off). `--deepspeed_config FILE` fills what neither sets from a DeepSpeed JSON.\n")
    print(markdown_reference())


if __name__ == "__main__":
    main()
