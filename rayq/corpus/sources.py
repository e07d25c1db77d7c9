"""User sources: txt / jsonl / Parquet globs, local or on a pyarrow filesystem (s3://, gs://)."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from typing import Iterable, Iterator

from rayq.corpus.document import Document
from rayq.corpus.embedded import embedded_documents
from rayq.corpus.large import large_documents
from rayq.errors import UserError

__all__ = ["read_sources", "load_documents", "jsonl_objects"]


# ============================================================================ user sources

TEXT_EXT = (".txt", ".text", ".md")
JSONL_EXT = (".jsonl", ".ndjson")
PARQUET_EXT = (".parquet", ".pq")
_KNOWN_EXT = TEXT_EXT + JSONL_EXT + PARQUET_EXT


def _by_path(items) -> list:
    return sorted(items, key=lambda item: item[1])


def _expand(source: str) -> list[tuple[object, str]]:
    """A source (glob, directory or URI) -> sorted list of (filesystem or None, path)."""
    if "://" in source:
        import pyarrow.fs as pafs

        magic = min((i for i in (source.find(c) for c in "*?[") if i >= 0), default=-1)
        # Globs on a remote filesystem: list the directory before the first wildcard and match.
        root_uri = source if magic < 0 else source[:magic].rsplit("/", 1)[0]
        try:
            fs, root = pafs.FileSystem.from_uri(root_uri)
            if magic >= 0:
                pattern = root.rstrip("/") + source[len(root_uri) :]
                selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
                return _by_path((fs, i.path) for i in fs.get_file_info(selector) if i.is_file and fnmatch.fnmatch(i.path, pattern))
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                return _by_path((fs, i.path) for i in infos if i.is_file and i.path.endswith(_KNOWN_EXT))
            return [] if info.type == pafs.FileType.NotFound else [(fs, root)]
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad URIs/credentials
            raise UserError(f"data.sources: cannot open {source} ({str(exc).splitlines()[0]})") from None
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        hits = [p for p in glob.glob(os.path.join(expanded, "**", "*"), recursive=True) if p.endswith(_KNOWN_EXT)]
    else:
        hits = glob.glob(expanded, recursive=True)
    return _by_path((None, p) for p in hits if os.path.isfile(p))


def _open(fs, path: str):
    return open(path, "rb") if fs is None else fs.open_input_file(path)


def _doc_base(path: str, common: str) -> str:
    rel = path[len(common) :].lstrip("/\\") if common else os.path.basename(path)
    for ext in _KNOWN_EXT:
        if rel.endswith(ext):
            rel = rel[: -len(ext)]
    return rel.replace(os.sep, "/")


def _read_text_file(fs, path: str, base: str) -> Iterator[Document]:
    with _open(fs, path) as fh:
        raw = fh.read()
    try:
        yield Document(base, raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def jsonl_objects(lines: Iterable[str], where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank JSONL line; a malformed line is a UserError
    naming `where` and the line (shared by corpus sources and the eval room's task files)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _read_jsonl_file(fs, path: str, base: str) -> Iterator[Document]:
    with _open(fs, path) as fh:
        lines = fh.read().decode("utf-8", errors="replace").splitlines()
    for lineno, row in jsonl_objects(lines, path):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path}:{lineno}: expected an object with a string field \"text\"")
        name = row.get("name", row.get("id"))
        yield Document(f"{base}/{name if name is not None else lineno}", row["text"])


def _read_parquet_file(fs, path: str, base: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, filesystem=fs) if fs is not None else pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "text" not in names:
            raise UserError(f"{path}: Parquet file has no column \"text\" (columns: {', '.join(names)})")
        id_col = "name" if "name" in names else "id" if "id" in names else None
        table = pf.read(columns=["text"] + ([id_col] if id_col else []))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for bad files
        raise UserError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0]})") from None
    texts = table.column("text").to_pylist()
    ids = table.column(id_col).to_pylist() if id_col else range(len(texts))
    for i, (text, ident) in enumerate(zip(texts, ids)):
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"{path}: column \"text\" row {i} is not a string")
        yield Document(f"{base}/{ident}", text)


def read_sources(sources: Iterable[str]) -> list[Document]:
    """Documents from user sources: txt (one document per file), jsonl (field "text", one document
    per line; "name"/"id" fields name it), Parquet (column "text"), local globs or pyarrow URIs.

    Names are paths relative to the common parent of all matched files, without extension; jsonl
    and Parquet rows append `/<name|id|line or row>`.
    """
    files: list[tuple[object, str]] = []
    for source in sources:
        hits = _expand(source)
        if not hits:
            raise UserError(f"data.sources: no file matches {source}")
        files += hits
    paths = [p for _, p in files]
    common = os.path.commonpath(paths) if len(paths) > 1 else ""
    if common in paths:
        common = os.path.dirname(common)
    docs: list[Document] = []
    for fs, path in files:
        base = _doc_base(path, common)
        if path.endswith(JSONL_EXT):
            reader = _read_jsonl_file
        elif path.endswith(PARQUET_EXT):
            reader = _read_parquet_file
        elif path.endswith(TEXT_EXT):
            reader = _read_text_file
        else:
            raise UserError(f"{path}: unknown file type (expected {', '.join(_KNOWN_EXT)})")
        try:
            docs += reader(fs, path, base)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    seen: dict[str, int] = {}
    for d in docs:
        seen[d.name] = seen.get(d.name, 0) + 1
    dups = [n for n, c in seen.items() if c > 1]
    if dups:
        raise UserError(f"data.sources: duplicate document name {dups[0]!r}; give rows distinct \"name\" values")
    return docs


def load_documents(data_cfg, progress=None) -> list[Document]:
    """The documents a `DataConfig` asks for: its sources, or the embedded corpus (data.corpus) if none."""
    if data_cfg.sources:
        return read_sources(data_cfg.sources)
    if data_cfg.corpus == "large":
        return large_documents(data_cfg.cache_dir, progress=progress)
    return embedded_documents(data_cfg.cache_dir, progress=progress)
