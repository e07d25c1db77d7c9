"""A small, structured English-like corpus written inside the tests (no download, seconds to
prepare), and the `tiny` config pointed at it. Shared by the tests of every room."""

from __future__ import annotations

import random
from pathlib import Path

from rayq import config as config_io

SUBJECTS = ["the king", "a shepherd", "the old woman", "my brother", "the young queen", "a stranger",
            "the priest", "her sister", "the captain", "our neighbour"]
VERBS = ["saw", "loved", "found", "followed", "feared", "remembered", "called", "answered", "praised", "left"]
OBJECTS = ["the river", "a small house", "the golden ring", "the dark forest", "his father", "the letter",
           "the city gate", "a white horse", "the morning bread", "the long road"]
TAILS = ["in the spring", "before the night came", "with great joy", "without a word", "at the end of the day",
         "for many years", "in silence", "near the sea"]


def write_corpus(root: Path, docs: int = 8, sentences: int = 220, seed: int = 0) -> list[str]:
    """`docs` text files of grammatical sentences; returns their paths."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(docs):
        lines = []
        for _ in range(sentences):
            s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."
            lines.append(s[0].upper() + s[1:])
        path = root / f"book{d}.txt"
        path.write_text(" ".join(lines) + "\n")
        paths.append(str(path))
    return paths


def tiny_config(corpus_dir: Path, cache_dir: Path, *overrides: str):
    """The `tiny` preset on the test corpus: vocab 384, held-out document book7."""
    write_corpus(corpus_dir)
    return config_io.resolve("tiny", overrides=[
        f"data.sources=['{corpus_dir}/*.txt']", "data.heldout_documents=[book7]",
        f"data.cache_dir={cache_dir}", "data.tokenizer_train_chars=200000", "model.vocab_size=384",
        "data.shard_tokens=4096", *overrides])
