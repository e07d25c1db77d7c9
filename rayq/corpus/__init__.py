"""Documents to pre-train on: the embedded default corpus (public-domain books from Debian
packages, `embedded.py`) and user sources (txt / jsonl / Parquet globs, local or on a pyarrow
filesystem, `sources.py`).

A document is a `(name, text)` pair. Names are stable across runs and machines, because the
held-out split and the eval tasks refer to documents by name (`austen/emma`, `kjv/genesis`).
"""

from __future__ import annotations

from rayq.corpus.document import Document
from rayq.corpus.embedded import EMBEDDED_PACKAGES, embedded_documents
from rayq.corpus.sources import jsonl_objects, load_documents, read_sources

__all__ = [
    "Document",
    "EMBEDDED_PACKAGES",
    "embedded_documents",
    "read_sources",
    "load_documents",
    "jsonl_objects",
]
