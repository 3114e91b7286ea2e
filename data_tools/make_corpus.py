"""Write a synthetic multilingual corpus as jsonl, for tests and benchmarks that cannot download one.

Each line is {"id": int, "lang": str, "text": str}. Documents are 50-600 words in one of several
languages and scripts (Latin with accents, Cyrillic, Greek, Arabic, Devanagari, CJK without spaces),
so a byte-level BPE sees multi-byte UTF-8 and a realistic spread of token lengths. Words are made
from per-language syllables and drawn with a Zipf-like frequency, so BPE merges behave roughly as
on real text. The same seed and size always give the same bytes.

    python data_tools/make_corpus.py --output corpus.jsonl --size-mb 100 --seed 0
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from megatron_bloom.errors import run_main

MB = 1_000_000  # sizes are SI megabytes throughout the data tools and benchmarks

# Syllables per language; words are 1-4 of them. Kept short: variety comes from combinations.
_SYLLABLES = {
    "en": "the an ing er ed on at re st is ly tion com pro ver der al ous ment ter ble con ar".split(),
    "fr": "le la ment eau ou ai é è tion re de qu ien on ê ç ette oir ais au ille".split(),
    "es": "el la ción os as ña ár ue ie de re lo mos ando ero ía ad ble ón co".split(),
    "de": "sch ung ein ge en er ä ö ü ß lich keit ver zu st rei heit chen au ie".split(),
    "ru": "ст ра ов но ен ко то на ть ли ва ре ия ни пр ый ая ост ель ще".split(),
    "el": "το να κα λη μα τι σε πο ρο ος ης ει ου αι νε ση πα λο μέ ία".split(),
    "ar": "ال ب ت ة م ن ي و ر س ك ل ع د ح ف ق ج ه ش".split(),
    "hi": "क ना र त स म ल प ह ग ये है में की का ने से को दी ता".split(),
    "zh": list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"),
}
# CJK text has no spaces between words; every other language here separates words with one.
_SEPARATOR = {lang: ("" if lang == "zh" else " ") for lang in _SYLLABLES}
_FULL_STOP = {"zh": "。", "hi": "।", "ar": ".", "el": ".", "ru": ".", "en": ".", "fr": ".", "es": ".", "de": "."}
_WORDS_PER_LANG = 3000


def _build_vocab(rng: np.random.Generator, lang: str) -> np.ndarray:
    syllables = _SYLLABLES[lang]
    max_parts = 2 if lang == "zh" else 4
    words = set()
    while len(words) < _WORDS_PER_LANG:
        n_parts = int(rng.integers(1, max_parts + 1))
        words.add("".join(syllables[i] for i in rng.integers(0, len(syllables), n_parts)))
    # Sorted first so the set's iteration order cannot matter, then shuffled so that Zipf rank is
    # unrelated to spelling (otherwise the most frequent words would all share a prefix).
    return rng.permutation(np.array(sorted(words), dtype=object))


def _zipf_probs(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** 1.05
    return p / p.sum()


class CorpusGenerator:
    """Deterministic document stream; `documents()` yields (lang, text) forever."""

    def __init__(self, seed: int = 0, min_words: int = 50, max_words: int = 600):
        self._rng = np.random.default_rng(seed)
        self._langs = sorted(_SYLLABLES)
        self._vocab = {lang: _build_vocab(self._rng, lang) for lang in self._langs}
        self._cdf = np.cumsum(_zipf_probs(_WORDS_PER_LANG))
        self._min_words, self._max_words = min_words, max_words

    def document(self) -> tuple[str, str]:
        rng = self._rng
        lang = self._langs[int(rng.integers(0, len(self._langs)))]
        n_words = int(rng.integers(self._min_words, self._max_words + 1))
        # Inverse-CDF sampling: one vectorised draw per document instead of a call per word.
        idx = np.minimum(np.searchsorted(self._cdf, rng.random(n_words)), _WORDS_PER_LANG - 1)
        words = self._vocab[lang][idx]
        sep, stop = _SEPARATOR[lang], _FULL_STOP[lang]
        sentences, start = [], 0
        while start < n_words:
            end = min(n_words, start + int(rng.integers(6, 21)))
            sentence = sep.join(words[start:end])
            sentences.append(sentence[:1].upper() + sentence[1:] + stop)
            start = end
        # Paragraph breaks every few sentences, so documents contain newlines as real ones do.
        paragraphs = [sep.join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
        return lang, "\n\n".join(paragraphs)


def write_corpus(path: str, size_mb: float, seed: int = 0) -> int:
    """Write documents until the file holds at least `size_mb` MB; returns the number of documents."""
    target = int(size_mb * MB)
    gen = CorpusGenerator(seed)
    written, n_docs = 0, 0
    with open(path, "wb") as f:
        while written < target:
            lines = []
            for _ in range(256):
                lang, text = gen.document()
                lines.append(json.dumps({"id": n_docs, "lang": lang, "text": text}, ensure_ascii=False))
                n_docs += 1
            block = ("\n".join(lines) + "\n").encode("utf-8")
            f.write(block)
            written += len(block)
    return n_docs


def make_corpus_command(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--size-mb", type=float, default=10.0, help="minimum size in MB (10^6 bytes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_docs = write_corpus(args.output, args.size_mb, args.seed)
    print(f"wrote {n_docs} documents to {args.output}", file=sys.stderr)
    return 0


def main(argv=None) -> None:
    """``python data_tools/make_corpus.py`` and ``megatron-bloom-make-corpus``."""
    run_main(make_corpus_command, argv)


if __name__ == "__main__":
    main()
