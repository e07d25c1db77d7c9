"""Loaders of the released file formats of the paper's eight tasks (no download at run time).

Prompt formats follow lm-evaluation-harness so numbers are comparable with what the community
reports. Errors name the file and line (`UserError`, exit 2). Each loader is `(path, seed) -> items`.
"""

from __future__ import annotations

import csv
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from rayq.errors import UserError
from rayq.eval.task_items import LastWord, MultipleChoice

__all__ = ["load_copa", "load_hellaswag", "load_piqa", "load_storycloze", "load_winogrande", "load_lambada",
           "load_paralex", "check_file", "multiple_choice"]


# ============================================================================ file reading helpers


def check_file(path: Path, task: str) -> Path:
    if not path.exists():
        raise UserError(f"task {task}: file not found: {path}")
    if not path.is_file():
        raise UserError(f"task {task}: not a file: {path}")
    return path


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line is a UserError naming it."""
    from rayq.corpus import jsonl_objects

    with open(path, encoding="utf-8") as fh:
        yield from jsonl_objects(fh, str(path))


def _field(obj: Mapping, key: str, path: Path, lineno: int, kind: type = str):
    if key not in obj:
        raise UserError(f"{path}:{lineno}: missing field {key!r}")
    value = obj[key]
    if kind is int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{path}:{lineno}: field {key!r} should be an integer, got {value!r}") from None
    if not isinstance(value, kind):
        raise UserError(f"{path}:{lineno}: field {key!r} should be a {kind.__name__}, got {type(value).__name__}")
    return value


def _label(value: int, n: int, path: Path, lineno: int, offset: int = 0) -> int:
    label = value - offset
    if not 0 <= label < n:
        raise UserError(f"{path}:{lineno}: label {value} out of range for {n} choices")
    return label


def multiple_choice(context: str, choices: Sequence[str], label: int) -> MultipleChoice:
    return MultipleChoice(tuple(context for _ in choices), tuple(choices), label)


def _nonempty(items: list, path: Path) -> list:
    if not items:
        raise UserError(f"{path}: no items found")
    return items


# ============================================================================ the paper's eight tasks


def _copa_prompt(premise: str, question: str, where: str) -> str:
    # lm-eval's COPA prompt: the premise without its final period, then "because" / "therefore"
    connector = {"cause": "because", "effect": "therefore"}.get(question)
    if connector is None:
        raise UserError(f"{where}: question/asks-for should be 'cause' or 'effect', got {question!r}")
    premise = premise.strip()
    return (premise[:-1] if premise.endswith((".", "!", "?")) else premise) + f" {connector}"


def _copa_choice(text: str) -> str:
    text = text.strip()
    return " " + text[:1].lower() + text[1:]


def load_copa(path: Path, seed: int = 0) -> list:
    """COPA: the original release (copa-dev.xml / copa-test.xml, 500 items each) or SuperGLUE's
    jsonl (val.jsonl, 100 items: the paper's "Copa100"), detected by the file suffix."""
    items = []
    if path.suffix.lower() == ".xml":
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            line, col = exc.position
            raise UserError(f"{path}:{line}: malformed XML (column {col})") from None
        for n, item in enumerate(root.iter("item"), 1):
            where = f"{path}: item {item.get('id', n)}"
            texts = {tag: item.findtext(tag) for tag in ("p", "a1", "a2")}
            if any(v is None for v in texts.values()):
                raise UserError(f"{where}: expected <p>, <a1> and <a2>")
            try:
                label = int(item.get("most-plausible-alternative", "")) - 1
            except ValueError:
                raise UserError(f"{where}: missing most-plausible-alternative") from None
            if label not in (0, 1):
                raise UserError(f"{where}: most-plausible-alternative should be 1 or 2")
            items.append(multiple_choice(_copa_prompt(texts["p"], item.get("asks-for", ""), where),
                             [_copa_choice(texts["a1"]), _copa_choice(texts["a2"])], label))
        return _nonempty(items, path)
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        context = _copa_prompt(_field(obj, "premise", path, lineno), _field(obj, "question", path, lineno), where)
        choices = [_copa_choice(_field(obj, k, path, lineno)) for k in ("choice1", "choice2")]
        items.append(multiple_choice(context, choices, _label(_field(obj, "label", path, lineno, int), 2, path, lineno)))
    return _nonempty(items, path)


def _hellaswag_clean(text: str) -> str:
    # WikiHow artifacts, removed as lm-eval does: "[title]" becomes a sentence break, other [tags] go
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def load_hellaswag(path: Path, seed: int = 0) -> list:
    """HellaSwag's released jsonl (hellaswag_val.jsonl): ctx_a, ctx_b, activity_label, endings, label."""
    items = []
    for lineno, obj in _jsonl(path):
        ctx = _field(obj, "ctx_a", path, lineno) + " " + _field(obj, "ctx_b", path, lineno).capitalize()
        query = _hellaswag_clean(_field(obj, "activity_label", path, lineno) + ": " + ctx)
        endings = _field(obj, "endings", path, lineno, list)
        choices = [" " + _hellaswag_clean(str(e)) for e in endings]
        items.append(multiple_choice(query, choices, _label(_field(obj, "label", path, lineno, int), len(choices), path, lineno)))
    return _nonempty(items, path)


def _piqa_labels(path: Path) -> Path:
    # the release ships valid.jsonl next to valid-labels.lst (train.jsonl / train-labels.lst)
    if path.is_dir():
        path = path / "valid.jsonl"
    return path.with_name(f"{path.stem}-labels.lst")


def load_piqa(path: Path, seed: int = 0) -> list:
    """PIQA's released validation set: valid.jsonl (goal, sol1, sol2) + valid-labels.lst (0/1 per line)."""
    if path.is_dir():
        path = check_file(path / "valid.jsonl", "piqa")
    labels_path = _piqa_labels(path)
    if not labels_path.is_file():
        raise UserError(f"task piqa: labels file not found: {labels_path} (released next to {path.name})")
    labels = []
    for lineno, line in enumerate(labels_path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                labels.append((lineno, int(line)))
            except ValueError:
                raise UserError(f"{labels_path}:{lineno}: expected 0 or 1, got {line.strip()!r}") from None
    items = []
    for n, (lineno, obj) in enumerate(_jsonl(path)):
        if n >= len(labels):
            raise UserError(f"{path}:{lineno}: no label for this line in {labels_path} ({len(labels)} labels)")
        choices = [" " + _field(obj, k, path, lineno) for k in ("sol1", "sol2")]
        items.append(multiple_choice(f"Question: {_field(obj, 'goal', path, lineno)}\nAnswer:", choices,
                         _label(labels[n][1], 2, labels_path, labels[n][0])))
    if len(items) != len(labels):
        raise UserError(f"{labels_path}: {len(labels)} labels for {len(items)} items in {path}")
    return _nonempty(items, path)


_STORY_COLUMNS = {  # released csv header -> HF dataset name (both accepted)
    "InputSentence1": "input_sentence_1", "InputSentence2": "input_sentence_2",
    "InputSentence3": "input_sentence_3", "InputSentence4": "input_sentence_4",
    "RandomFifthSentenceQuiz1": "sentence_quiz1", "RandomFifthSentenceQuiz2": "sentence_quiz2",
    "AnswerRightEnding": "answer_right_ending",
}


def load_storycloze(path: Path, seed: int = 0) -> list:
    """Story Cloze Test csv (cloze_test_val__spring2016 / test): four sentences, two endings, 1/2 answer."""
    items = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = set(reader.fieldnames or [])
        cols = {k: (k if k in header else v) for k, v in _STORY_COLUMNS.items()}
        missing = [k for k, c in cols.items() if c not in header]
        if missing:
            raise UserError(f"{path}:1: csv header lacks {', '.join(missing)} (the released Story Cloze columns)")
        for row in reader:
            lineno = reader.line_num
            if None in row or any(row[c] is None for c in cols.values()):
                raise UserError(f"{path}:{lineno}: expected {len(reader.fieldnames)} columns")
            context = " ".join(row[cols[f"InputSentence{i}"]].strip() for i in range(1, 5))
            choices = [" " + row[cols[k]].strip() for k in ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2")]
            try:
                answer = int(row[cols["AnswerRightEnding"]])
            except ValueError:
                raise UserError(f"{path}:{lineno}: AnswerRightEnding should be 1 or 2") from None
            items.append(multiple_choice(context, choices, _label(answer, 2, path, lineno, offset=1)))
    return _nonempty(items, path)


def load_winogrande(path: Path, seed: int = 0) -> list:
    """WinoGrande jsonl (dev.jsonl): sentence with one "_", option1, option2, answer "1"/"2".

    Partial scoring (Trinh & Le 2018, as lm-eval): each choice's context is the sentence up to the
    blank with the option filled in; the shared continuation is the rest of the sentence.
    """
    items = []
    for lineno, obj in _jsonl(path):
        sentence = _field(obj, "sentence", path, lineno)
        if "_" not in sentence:
            raise UserError(f"{path}:{lineno}: sentence has no blank '_'")
        answer = str(obj.get("answer", "")).strip()
        if answer not in ("1", "2"):
            raise UserError(f"{path}:{lineno}: answer should be \"1\" or \"2\", got {answer!r} "
                            "(the released test split has no answers; use dev.jsonl)")
        blank = sentence.index("_")
        contexts = tuple(sentence[:blank] + _field(obj, k, path, lineno) for k in ("option1", "option2"))
        rest = " " + sentence[blank + 1:].strip()
        items.append(MultipleChoice(contexts, (rest, rest), int(answer) - 1))
    return _nonempty(items, path)


def _split_last_word(text: str) -> Optional[tuple[str, str]]:
    context, _, word = text.rstrip().rpartition(" ")
    return (context, " " + word) if context and word else None


def load_lambada(path: Path, seed: int = 0) -> list:
    """LAMBADA: jsonl with {"text": passage} (lambada_test.jsonl), or plain text, one passage a line.
    The target is the last space-separated word, as in lm-eval's lambada_openai."""
    items = []
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = ((n, _field(obj, "text", path, n)) for n, obj in _jsonl(path))
    else:
        rows = ((n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip())
    for lineno, text in rows:
        split = _split_last_word(text)
        if split is None:
            raise UserError(f"{path}:{lineno}: passage needs at least two words")
        items.append(LastWord(*split))
    return _nonempty(items, path)


PARALEX_CHOICES = 4


def load_paralex(path: Path, seed: int = 0) -> list:
    """Paralex (Fader et al. 2013) WikiAnswers question paraphrases, tab-separated
    `question<TAB>paraphrase[<TAB>word alignment]` per line (the word_alignments.txt layout).

    The released corpus has no multiple-choice split, so items are built here: the true
    paraphrase against paraphrases of three other questions (seeded), decided by log-likelihood
    per byte, since candidate questions differ much in length.
    """
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise UserError(f"{path}:{lineno}: expected question<TAB>paraphrase")
        pairs.append((fields[0].strip(), fields[1].strip()))
    if len(pairs) < 2:
        raise UserError(f"{path}: need at least two question/paraphrase lines, found {len(pairs)}")
    rng = random.Random(f"paralex:{seed}")
    items = []
    for i, (question, para) in enumerate(pairs):
        others = sorted({p for j, (_, p) in enumerate(pairs) if j != i and p != para})
        wrong = rng.sample(others, min(PARALEX_CHOICES - 1, len(others)))
        choices = [para] + wrong
        rng.shuffle(choices)
        items.append(multiple_choice(f"Question: {question}\nParaphrase:", [" " + c for c in choices], choices.index(para)))
    return items
