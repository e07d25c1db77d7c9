"""Built-in tasks made from the held-out documents of the prepared corpus, so the embedded default
measures zero-shot ability with no external data: `heldout-lambada` (last word of a passage,
chosen among words that already occur in the passage, LAMBADA's hallmark), `heldout-cloze` (true
next sentence vs three sentences from elsewhere, HellaSwag style) and `heldout-ppl` (bits per
byte). They are deterministic for a seed. Each builder is `(texts, size, seed) -> items`.
"""

from __future__ import annotations

import random
import re
from typing import Mapping

from rayq.errors import UserError
from rayq.eval.task_formats import multiple_choice
from rayq.eval.task_items import LastWord, Passage

__all__ = ["build_heldout_lambada", "build_heldout_cloze", "build_heldout_ppl"]


# ============================================================================ built-in held-out tasks

_WORD_STRIP = ".,;:!?\"'()[]{}-*_"
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
LAMBADA_CONTEXT_WORDS = 48  # words of context; scoring keeps the most recent tokens that fit seq_len
CLOZE_CONTEXT_SENTENCES = 3
CLOZE_CHOICES = 4


def _documents(texts: Mapping[str, str]) -> list[tuple[str, str]]:
    if not texts:
        raise UserError("built-in tasks need held-out documents (data.heldout_documents is empty)")
    return sorted(texts.items())  # name order, so the items do not depend on dict order


def build_heldout_lambada(texts: Mapping[str, str], size: int, seed: int = 0) -> list:
    """Last-word items from held-out passages: the target is an alphabetic word of >= 3 letters that
    already occurs in the preceding context, so the passage carries what is needed to predict it."""
    candidates = []
    for name, text in _documents(texts):
        words = text.split()
        for i in range(LAMBADA_CONTEXT_WORDS // 2, len(words)):
            target = words[i].strip(_WORD_STRIP)
            if len(target) < 3 or not target.isalpha():
                continue
            context = words[max(0, i - LAMBADA_CONTEXT_WORDS):i]
            if target in {w.strip(_WORD_STRIP) for w in context}:
                candidates.append((name, i))
    if not candidates:
        raise UserError("heldout-lambada: the held-out documents are too short to build items")
    rng = random.Random(f"heldout-lambada:{seed}")
    chosen = sorted(rng.sample(candidates, min(size, len(candidates))))
    split_words = {name: text.split() for name, text in texts.items()}
    items = []
    for name, i in chosen:
        words = split_words[name]
        items.append(LastWord(" ".join(words[max(0, i - LAMBADA_CONTEXT_WORDS):i]), " " + words[i].strip(_WORD_STRIP)))
    return items


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def build_heldout_cloze(texts: Mapping[str, str], size: int, seed: int = 0) -> list:
    """HellaSwag-style items: three sentences of context, the true next sentence against three
    sentences from elsewhere in the held-out text (at least 20 sentences away, of similar length,
    so neither position nor length gives the answer away)."""
    docs = [(name, _sentences(text)) for name, text in _documents(texts)]
    pool = [(d, j) for d, (_, sents) in enumerate(docs) for j in range(len(sents)) if 3 <= len(sents[j].split()) <= 40]
    anchors = [(d, j) for d, j in pool if j >= CLOZE_CONTEXT_SENTENCES]
    if len(pool) < CLOZE_CHOICES * 4 or not anchors:
        raise UserError("heldout-cloze: the held-out documents have too few sentences to build items")
    rng = random.Random(f"heldout-cloze:{seed}")
    items = []
    for d, j in sorted(rng.sample(anchors, min(size, len(anchors)))):
        sents = docs[d][1]
        true = sents[j]
        wrong: list[str] = []
        for attempt in range(400):  # rejection sampling: cheap on a large pool, relaxed if it fails
            e, k = pool[rng.randrange(len(pool))]
            cand = docs[e][1][k]
            ok = (e != d or abs(k - j) > 20) and cand != true and cand not in wrong
            if ok and (attempt >= 200 or 0.5 <= len(cand) / len(true) <= 2.0):
                wrong.append(cand)
                if len(wrong) == CLOZE_CHOICES - 1:
                    break
        if len(wrong) < CLOZE_CHOICES - 1:
            raise UserError("heldout-cloze: the held-out documents have too few distinct sentences")
        choices = [true] + wrong
        rng.shuffle(choices)
        context = " ".join(sents[j - CLOZE_CONTEXT_SENTENCES:j])
        items.append(multiple_choice(context, [" " + c for c in choices], choices.index(true)))
    return items


PPL_PASSAGE_CHARS = 2000


def build_heldout_ppl(texts: Mapping[str, str], size: int, seed: int = 0) -> list:
    """Held-out passages of ~2000 characters cut at line breaks, evenly spread over the documents."""
    passages = []
    for _, text in _documents(texts):
        buf = ""
        for line in text.splitlines(keepends=True):
            buf += line
            if len(buf) >= PPL_PASSAGE_CHARS:
                passages.append(buf)
                buf = ""
        if buf.strip():
            passages.append(buf)
    if not passages:
        raise UserError("heldout-ppl: the held-out documents are empty")
    step = max(1, len(passages) // size)
    return [Passage(p) for p in passages[::step][:size]]
