"""Helpers of the eval tests: a char tokenizer, a fixed bigram LM, a toy corpus, SentencePiece on it."""

from __future__ import annotations

import io
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

FIXTURES = Path(__file__).parent / "fixtures"


class CharTokenizer:
    """One token per latin-1 character (ids 0..255); no BOS."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return [ord(c) if ord(c) < 256 else ord("?") for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i)) for i in ids)


REFERENCE_TEXT = (
    "the cat sat on the mat. the mat was warm. the dog ate the bone. the dog sat on the mat. "
    "the man ran to the park. he was late for the game. it was the end of the day. he was hungry. "
    "put the cat on the warm mat. put the cake in the warm oven. walk to the park. the man was late. "
    "in the oven. he was happy at the end of the day. what keeps the cat warm ? who made the cake ? "
)


class BigramLM(nn.Module):
    """A fixed character bigram model behind the LM interface: forward(idx) -> logits[B, T, V].

    logits[a, b] = log((count(a -> b) + 0.1) / ...) from REFERENCE_TEXT, plus a tiny id-dependent
    term so that no two successors tie (greedy decoding is unambiguous)."""

    def __init__(self, text: str = REFERENCE_TEXT, max_len: int = 24):
        super().__init__()
        counts = np.full((256, 256), 0.1)
        for a, b in zip(text, text[1:]):
            counts[ord(a), ord(b)] += 1.0
        logp = np.log(counts / counts.sum(1, keepdims=True)) + 1e-4 * np.arange(256)[None, :] / 256
        self.register_buffer("table", torch.tensor(logp, dtype=torch.float32))
        self.cfg = SimpleNamespace(seq_len=max_len)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError("sequence longer than max_len")
        return self.table[idx]

    def ref_logprobs(self) -> np.ndarray:
        return torch.log_softmax(self.table.double(), -1).numpy()


def reference_ll(model: BigramLM, context: str, continuation: str) -> tuple[float, bool]:
    """Independent scoring of one request: sum over continuation chars of log P(c_i | c_{i-1})."""
    lp = model.ref_logprobs()
    text = context + continuation
    start = len(context.rstrip(" "))
    ll, greedy = 0.0, True
    for i in range(start, len(text)):
        a, b = ord(text[i - 1]), ord(text[i])
        ll += lp[a, b]
        greedy &= int(np.argmax(lp[a])) == b
    return ll, greedy


# ----------------------------------------------------------------------------- toy corpus + SentencePiece

NAMES = ["Tom", "Ann", "Bob", "Eve", "Sam", "Kim", "Joe", "Liz"]
OBJECTS = ["ball", "book", "cup", "hat", "kite", "box"]
COLORS = ["red", "blue", "green", "yellow"]
PLACES = ["park", "house", "garden", "school", "shop"]


def toy_story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    o, c, p = rng.choice(OBJECTS), rng.choice(COLORS), rng.choice(PLACES)
    return (f"{a} has a {c} {o}. {a} goes to the {p} with the {c} {o}. At the {p}, {a} meets {b}. "
            f"{a} gives the {c} {o} to {b}. {b} says thank you to {a}.")


def toy_text(n_stories: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(toy_story(rng) for _ in range(n_stories)) + "\n"


def train_spm(text: str, vocab_size: int = 320):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", byte_fallback=True, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()), buf.getvalue()

