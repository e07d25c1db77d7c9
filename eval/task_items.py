"""What a task is made of: the three item kinds, `Task` (loaded items) and `TaskSpec` (a registry
entry). Each kind has its own scoring rule in `rayq.eval.scoring`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

__all__ = ["MULTIPLE_CHOICE", "LAST_WORD", "PERPLEXITY", "MultipleChoice", "LastWord", "Passage", "Item",
           "Task", "TaskSpec"]

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
