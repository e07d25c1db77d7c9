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

from pathlib import Path
from typing import Mapping, Optional, Sequence

from rayq.errors import UserError, did_you_mean
from rayq.eval.heldout_tasks import build_heldout_cloze, build_heldout_lambada, build_heldout_ppl
from rayq.eval.task_formats import (
    check_file,
    load_copa,
    load_hellaswag,
    load_lambada,
    load_paralex,
    load_piqa,
    load_storycloze,
    load_winogrande,
)
from rayq.eval.task_items import (
    LAST_WORD,
    MULTIPLE_CHOICE,
    PERPLEXITY,
    Item,
    LastWord,
    MultipleChoice,
    Passage,
    Task,
    TaskSpec,
)

__all__ = [
    "MULTIPLE_CHOICE", "LAST_WORD", "PERPLEXITY", "MultipleChoice", "LastWord", "Passage", "Item", "Task",
    "TaskSpec", "TASKS", "PAPER_TASKS", "list_tasks", "get_spec", "load_task", "load_tasks",
    "build_heldout_lambada", "build_heldout_cloze", "build_heldout_ppl",
]

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
    raise UserError(f"unknown task {name!r}{did_you_mean(key, TASKS, cutoff=0.5)} (rayq ls tasks: {', '.join(TASKS)})")


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
            check_file(p, spec.name)
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
