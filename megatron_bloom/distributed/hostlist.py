"""Expand SLURM hostlists such as ``gpu[001-004,007],login-a1`` (what ``scontrol show hostnames`` does)."""
from __future__ import annotations

import re
from typing import List


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist '{text}'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist '{text}'")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, whole: str) -> List[str]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range '{item}' in hostlist '{whole}'")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range '{item}' in hostlist '{whole}'")
        width = len(lo)  # zero padding is kept: gpu[001-003] -> gpu001 gpu002 gpu003
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, whole: str) -> List[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    prefix, suffix = pattern[: m.start()], pattern[m.end():]
    hosts = []
    for value in _expand_range(m.group(1), whole):
        hosts.extend(_expand_host(prefix + value + suffix, whole))  # several bracket groups: a[1-2]b[3-4]
    return hosts


def expand_hostlist(hostlist: str) -> List[str]:
    """All host names of a SLURM hostlist, in order."""
    if not hostlist or not hostlist.strip():
        raise ValueError("empty hostlist")
    hosts: List[str] = []
    for part in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_host(part, hostlist))
    return hosts
