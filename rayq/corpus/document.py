"""The unit of the corpus: a named document."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Document"]


@dataclass(frozen=True)
class Document:
    """A `(name, text)` pair. Names are stable across runs and machines, because the held-out
    split and the eval tasks refer to documents by name (`austen/emma`, `kjv/genesis`)."""

    name: str  # stable identifier, e.g. "austen/emma" or "notes/part-0"
    text: str
