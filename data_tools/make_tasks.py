"""Write small multilingual prompt/answer tasks with checkable answers, in xP3's jsonl layout.

    python data_tools/make_tasks.py --output tasks/ --num-train 4000 --num-heldout 200 --seed 0

writes ``tasks/train/<lang>/<task>.jsonl`` and ``tasks/heldout/<lang>/<task>.jsonl`` with rows
``{"inputs", "targets", "language", "dataset", "template"}`` (targets carry no leading space:
preprocess with ``--prepend-space``), and with ``--corpus FILE`` a plain-text jsonl (``text``) in
the same languages for pretraining a model that has seen the words (see ``corpus_texts``).
Tasks, per language:

    translate   "Translate to French: one two"     -> "un deux"       (number words 0-10, 1-3 of them)
    add         "Compute: 3 + 4 ="                 -> "7"             (digits 0-9)
    copy        "Repeat: seven two"                -> "seven two"
    reverse     "Reverse: one two three"           -> "three two one"

Held-out prompts are new: each task's items (the number sequence of translate/copy/reverse, the
(a, b) of add) are split once by the seed, and an item in the held-out part never appears in any
training row, in any language. The same arguments always give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron_bloom.atomic import atomic_write_text
from megatron_bloom.errors import UserError, run_main

NUMBERS: Dict[str, List[str]] = {
    "en": "zero one two three four five six seven eight nine ten".split(),
    "fr": "zéro un deux trois quatre cinq six sept huit neuf dix".split(),
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve diez".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun zehn".split(),
}
LANGUAGE_NAMES: Dict[str, Dict[str, str]] = {
    # LANGUAGE_NAMES[prompt language][target language]
    "en": {"en": "English", "fr": "French", "es": "Spanish", "de": "German"},
    "fr": {"en": "anglais", "fr": "français", "es": "espagnol", "de": "allemand"},
    "es": {"en": "inglés", "fr": "francés", "es": "español", "de": "alemán"},
    "de": {"en": "Englisch", "fr": "Französisch", "es": "Spanisch", "de": "Deutsch"},
}
TEMPLATES: Dict[str, Dict[str, str]] = {
    "translate": {"en": "Translate to {lang}: {x}", "fr": "Traduis en {lang} : {x}",
                  "es": "Traduce al {lang}: {x}", "de": "Übersetze ins {lang}: {x}"},
    "add": {"en": "Compute: {x} =", "fr": "Calcule : {x} =", "es": "Calcula: {x} =", "de": "Berechne: {x} ="},
    "copy": {"en": "Repeat: {x}", "fr": "Répète : {x}", "es": "Repite: {x}", "de": "Wiederhole: {x}"},
    "reverse": {"en": "Reverse: {x}", "fr": "Inverse : {x}", "es": "Invierte: {x}", "de": "Umkehren: {x}"},
}
TASKS = tuple(TEMPLATES)
LANGUAGES = tuple(NUMBERS)


def _sequences(max_len: int, base: int = 11) -> List[Tuple[int, ...]]:
    """Every tuple of 1..max_len numbers in [0, base)."""
    out: List[Tuple[int, ...]] = []
    for n in range(1, max_len + 1):
        grid = np.indices((base,) * n).reshape(n, -1).T
        out.extend(tuple(int(v) for v in row) for row in grid)
    return out


def task_items(task: str, max_words: int) -> List[Tuple[int, ...]]:
    if task == "add":
        return [(a, b) for a in range(10) for b in range(10)]
    if task == "reverse":
        return [s for s in _sequences(max_words) if len(s) >= 2]
    return _sequences(max_words)


def split_items(task: str, items: Sequence, heldout_fraction: float, seed: int) -> Tuple[list, list]:
    """(train items, held-out items): a seeded, language-independent split of the item space."""
    rng = np.random.RandomState([seed, TASKS.index(task)])
    order = rng.permutation(len(items))
    n_held = max(1, int(round(heldout_fraction * len(items))))
    held = sorted(order[:n_held].tolist())
    train = sorted(order[n_held:].tolist())
    return [items[i] for i in train], [items[i] for i in held]


def render(task: str, lang: str, item: Tuple[int, ...], target_lang: str) -> Tuple[str, str]:
    """(inputs, targets) of one row."""
    words = NUMBERS[lang]
    template = TEMPLATES[task][lang]
    if task == "add":
        a, b = item
        return template.format(x=f"{a} + {b}"), str(a + b)
    text = " ".join(words[i] for i in item)
    if task == "translate":
        answer = " ".join(NUMBERS[target_lang][i] for i in item)
        return template.format(lang=LANGUAGE_NAMES[lang][target_lang], x=text), answer
    if task == "copy":
        return template.format(x=text), text
    return template.format(x=text), " ".join(words[i] for i in reversed(item))


def make_rows(tasks: Sequence[str], languages: Sequence[str], split_items_of: Dict[str, list], count: int,
              rng: np.random.RandomState) -> List[dict]:
    """``count`` rows drawn uniformly over (task, language) and then over that task's items."""
    rows = []
    for _ in range(count):
        task = tasks[rng.randint(len(tasks))]
        lang = languages[rng.randint(len(languages))]
        items = split_items_of[task]
        item = items[rng.randint(len(items))]
        target_lang = lang
        if task == "translate":
            others = [l for l in languages if l != lang] or [lang]
            target_lang = others[rng.randint(len(others))]
        inputs, targets = render(task, lang, item, target_lang)
        template = f"{task}-{lang}" + (f"-to-{target_lang}" if task == "translate" else "")
        rows.append({"inputs": inputs, "targets": targets, "language": lang, "dataset": task, "template": template})
    return rows


def corpus_texts(languages: Sequence[str], count: int, rng: np.random.RandomState) -> List[str]:
    """Plain text in the task languages, the kind of thing a pretraining corpus teaches:

    counting runs ("trois quatre cinq"), repeated word lists ("two nine, two nine": where copying
    pays off), and glossary lines pairing a number word across languages ("sept = seven").
    """
    texts = []
    for _ in range(count):
        lang = languages[rng.randint(len(languages))]
        words = NUMBERS[lang]
        kind = rng.randint(3)
        if kind == 0:
            start = rng.randint(0, 8)
            text = " ".join(words[start:start + rng.randint(3, 11 - start + 1)])
        elif kind == 1:
            run = " ".join(words[i] for i in rng.randint(0, 11, size=rng.randint(1, 5)))
            text = ", ".join([run] * rng.randint(2, 4))
        else:
            other = languages[rng.randint(len(languages))]
            i = rng.randint(11)
            text = f"{words[i]} = {NUMBERS[other][i]}"
        texts.append(text + ".")
    return texts


def write_jsonl(path: str, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_split(out_dir: str, split: str, rows: List[dict]) -> List[str]:
    """One file per language folder and task, as xP3 is laid out; returns the files written."""
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for row in rows:
        groups.setdefault((row["language"], row["dataset"]), []).append(row)
    paths = []
    for (lang, task), group in sorted(groups.items()):
        path = os.path.join(out_dir, split, lang, f"{task}.jsonl")
        write_jsonl(path, group)
        paths.append(path)
    return paths


def read_tasks(folder: str) -> List[dict]:
    """Every row of the ``<lang>/<task>.jsonl`` files under ``folder`` (a split, a language, or the
    whole output), in a fixed order."""
    rows = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(".jsonl"):
                with open(os.path.join(root, name), encoding="utf-8") as fh:
                    rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def make_tasks_command(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder; writes train/<lang>/<task>.jsonl and heldout/<lang>/<task>.jsonl")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--languages", nargs="+", default=list(LANGUAGES), choices=LANGUAGES)
    p.add_argument("--num-train", type=int, default=4000, help="training rows (over all tasks and languages)")
    p.add_argument("--num-heldout", type=int, default=200, help="held-out rows")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of each task's items kept out of training")
    p.add_argument("--max-words", type=int, default=3, help="longest number sequence of translate/copy/reverse")
    p.add_argument("--corpus", default=None, help="also write a plain-text jsonl (key 'text') for pretraining")
    p.add_argument("--corpus-lines", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0.0 < args.heldout_fraction < 1.0 or args.max_words < 1 or args.num_train < 1 or args.num_heldout < 0:
        raise UserError("need 0 < --heldout-fraction < 1, --max-words >= 1, --num-train >= 1, --num-heldout >= 0")
    train_items, held_items = {}, {}
    for task in args.tasks:
        train_items[task], held_items[task] = split_items(task, task_items(task, args.max_words),
                                                          args.heldout_fraction, args.seed)
    rng = np.random.RandomState(args.seed)
    train = make_rows(args.tasks, args.languages, train_items, args.num_train, rng)
    held = make_rows(args.tasks, args.languages, held_items, args.num_heldout, rng)
    written = write_split(args.output, "train", train) + write_split(args.output, "heldout", held)
    if args.corpus:
        texts = corpus_texts(args.languages, args.corpus_lines, rng)
        write_jsonl(args.corpus, [{"text": t} for t in texts])
    print(f"wrote {len(train)} train and {len(held)} held-out rows in {len(written)} files under {args.output}"
          + (f"; corpus {args.corpus}" if args.corpus else ""), file=sys.stderr)
    return 0


def main(argv=None) -> None:
    """``python data_tools/make_tasks.py`` and ``megatron-bloom-make-tasks``."""
    run_main(make_tasks_command, argv)


if __name__ == "__main__":
    main()
