"""Eval tasks: a registry of names, loaders of the paper's eight released formats, built-in tasks.

A task is a list of items of one of three kinds, each with its own scoring rule (rayq.eval.scoring):

* `multiple_choice`: one (context, continuation) pair per choice; the choice with the highest
  log-likelihood wins (`acc`), or per character (`acc_norm`, lm-eval's definition), or per UTF-8
  byte (`acc_bytes`). WinoGrande's partial scoring is the same kind with per-choice *contexts*
  (sentence up to the blank + option) and a shared continuation (the rest of the sentence).
* `last_word`: LAMBADA style; correct when greedy decoding reproduces the target exactly.
* `perplexity`: passages scored token by token; reports bits per byte and perplexity.

Every file task reads the format its authors released (no download at run time); the path comes
from `eval.task_paths.<name>`. Prompt formats follow lm-evaluation-harness so numbers are
comparable with what the community reports. Errors name the file and line (`UserError`, exit 2).

The built-in tasks are made from the held-out documents of the prepared corpus, so the embedded
default measures zero-shot ability with no external data: `heldout-lambada` (last word of a
passage, chosen among words that already occur in the passage, LAMBADA's hallmark),
`heldout-cloze` (true next sentence vs three sentences from elsewhere, HellaSwag style) and
`heldout-ppl` (bits per byte). They are deterministic for a seed.
"""

from __future__ import annotations

import csv
import difflib
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

from rayq.errors import UserError

MULTIPLE_CHOICE, LAST_WORD, PERPLEXITY = "multiple_choice", "last_word", "perplexity"


@dataclass(frozen=True)
class MultipleChoice:
    contexts: tuple[str, ...]  # one per choice (identical except for WinoGrande's partial scoring)
    continuations: tuple[str, ...]  # one per choice; word-boundary spaces belong here (lm-eval)
    label: int  # index of the correct choice


@dataclass(frozen=True)
class LastWord:
    context: str
    target: str  # " word": greedy decoding must reproduce every token of it


@dataclass(frozen=True)
class Passage:
    text: str


Item = Union[MultipleChoice, LastWord, Passage]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # multiple_choice | last_word | perplexity
    primary: str  # the metric reported as `<task>/acc` (acc | acc_norm | acc_bytes), or bpb
    items: tuple
    source: str  # the file it came from, or "heldout:<documents>"

    @property
    def is_accuracy(self) -> bool:
        """Accuracy tasks enter `fp/acc` and the degradation; perplexity tasks do not (lower is better)."""
        return self.kind != PERPLEXITY

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    primary: str
    description: str
    file_hint: str  # the released file the loader reads ("" for built-in tasks)
    loader: Optional[Callable[[Path, int], list]] = None  # (path, seed) -> items
    builder: Optional[Callable[[Mapping[str, str], int, int], list]] = None  # (texts, size, seed) -> items

    @property
    def builtin(self) -> bool:
        return self.builder is not None


# ============================================================================ file reading helpers


def _check_file(path: Path, task: str) -> Path:
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


def _mc(context: str, choices: Sequence[str], label: int) -> MultipleChoice:
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
            items.append(_mc(_copa_prompt(texts["p"], item.get("asks-for", ""), where),
                             [_copa_choice(texts["a1"]), _copa_choice(texts["a2"])], label))
        return _nonempty(items, path)
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        context = _copa_prompt(_field(obj, "premise", path, lineno), _field(obj, "question", path, lineno), where)
        choices = [_copa_choice(_field(obj, k, path, lineno)) for k in ("choice1", "choice2")]
        items.append(_mc(context, choices, _label(_field(obj, "label", path, lineno, int), 2, path, lineno)))
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
        items.append(_mc(query, choices, _label(_field(obj, "label", path, lineno, int), len(choices), path, lineno)))
    return _nonempty(items, path)


def _piqa_labels(path: Path) -> Path:
    # the release ships valid.jsonl next to valid-labels.lst (train.jsonl / train-labels.lst)
    if path.is_dir():
        path = path / "valid.jsonl"
    return path.with_name(f"{path.stem}-labels.lst")


def load_piqa(path: Path, seed: int = 0) -> list:
    """PIQA's released validation set: valid.jsonl (goal, sol1, sol2) + valid-labels.lst (0/1 per line)."""
    if path.is_dir():
        path = _check_file(path / "valid.jsonl", "piqa")
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
        items.append(_mc(f"Question: {_field(obj, 'goal', path, lineno)}\nAnswer:", choices,
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
            items.append(_mc(context, choices, _label(answer, 2, path, lineno, offset=1)))
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
        items.append(_mc(f"Question: {question}\nParaphrase:", [" " + c for c in choices], choices.index(para)))
    return items


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
        items.append(_mc(context, [" " + c for c in choices], choices.index(true)))
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


# ============================================================================ registry

TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("piqa", MULTIPLE_CHOICE, "acc", "PIQA physical commonsense, validation split", "valid.jsonl + valid-labels.lst", loader=load_piqa),
    TaskSpec("hellaswag", MULTIPLE_CHOICE, "acc_norm", "HellaSwag sentence completion", "hellaswag_val.jsonl", loader=load_hellaswag),
    TaskSpec("winogrande", MULTIPLE_CHOICE, "acc", "WinoGrande co-reference, partial scoring", "dev.jsonl", loader=load_winogrande),
    TaskSpec("lambada", LAST_WORD, "acc", "LAMBADA last word, greedy exact match", "lambada_test.jsonl", loader=load_lambada),
    TaskSpec("copa", MULTIPLE_CHOICE, "acc", "COPA test (500 items)", "copa-test.xml", loader=load_copa),
    TaskSpec("copa100", MULTIPLE_CHOICE, "acc", "COPA dev as in SuperGLUE (100 items)", "val.jsonl (SuperGLUE) or copa-dev.xml", loader=load_copa),
    TaskSpec("storycloze", MULTIPLE_CHOICE, "acc", "Story Cloze Test 2016", "cloze_test_*_spring2016.csv", loader=load_storycloze),
    TaskSpec("paralex", MULTIPLE_CHOICE, "acc_bytes", "Paralex question paraphrase, likelihood per byte", "word_alignments.txt (tsv)", loader=load_paralex),
    TaskSpec("heldout-lambada", LAST_WORD, "acc", "last word of held-out passages (built-in)", "", builder=build_heldout_lambada),
    TaskSpec("heldout-cloze", MULTIPLE_CHOICE, "acc_norm", "true next sentence vs 3 distractors (built-in)", "", builder=build_heldout_cloze),
    TaskSpec("heldout-ppl", PERPLEXITY, "bpb", "bits per byte on held-out passages (built-in)", "", builder=build_heldout_ppl),
]}

PAPER_TASKS = ("piqa", "hellaswag", "winogrande", "lambada", "copa", "copa100", "storycloze", "paralex")


def list_tasks() -> list[TaskSpec]:
    return list(TASKS.values())


def get_spec(name: str) -> TaskSpec:
    key = name.strip().lower()
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, list(TASKS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown task {name!r}{hint} (rayq ls tasks: {', '.join(TASKS)})")


def load_task(name: str, *, path: Optional[str] = None, heldout_texts: Optional[Mapping[str, str]] = None,
              size: int = 200, seed: int = 0) -> Task:
    """One task by name: file tasks read `path`, built-in tasks are built from `heldout_texts`."""
    spec = get_spec(name)
    if spec.builtin:
        if heldout_texts is None:
            raise UserError(f"task {spec.name} is built from held-out documents; none were given")
        items = spec.builder(heldout_texts, size, seed)
        source = "heldout:" + ",".join(sorted(heldout_texts))
    else:
        if not path:
            raise UserError(f"task {spec.name} reads a local file: set eval.task_paths.{spec.name}=PATH "
                            f"(the released {spec.file_hint})")
        p = Path(path).expanduser()
        if not (spec.name == "piqa" and p.is_dir()):
            _check_file(p, spec.name)
        items = spec.loader(p, seed)
        source = str(p)
    return Task(spec.name, spec.kind, spec.primary, tuple(items), source)


def load_tasks(names: Sequence[str], task_paths: Mapping[str, str], *, heldout_texts=None, size: int = 200,
               seed: int = 0) -> list[Task]:
    """The tasks of an `EvalConfig` (names checked first, so a typo fails before any file is read)."""
    specs = [get_spec(n) for n in names]
    paths = {k.lower(): v for k, v in task_paths.items()}
    for key in paths:
        get_spec(key)  # a typo in a task_paths key is as much an error as one in tasks
    return [load_task(s.name, path=paths.get(s.name), heldout_texts=heldout_texts, size=size, seed=seed) for s in specs]
