"""Prepared data: documents -> SentencePiece tokenizer -> Parquet token shards (batches: `rayq.batches`).

`prepare(data_cfg, vocab_size)` builds (or finds) `<cache_dir>/prepared/<key>/`, where `key` hashes the documents'
names and texts plus the config fields that change the output, so every trial, worker and rerun
with the same inputs reuses one copy. It is built in a temporary sibling directory and renamed
into place, so a killed prepare never leaves a half-written cache, and concurrent workers racing
to build the same key simply keep the first finished copy.

Layout of a prepared directory (schema version 1):

    manifest.json          what is here: inputs hash, config, tokenizer, splits, shards (written last)
    tokenizer.model        SentencePiece model (byte fallback: any text encodes)
    train/00000.parquet    token shards of the train split
    heldout/00000.parquet  token shards of the held-out split
    heldout_texts.jsonl    raw text of the held-out documents: {"name", "text"} per line

Shard schema: one row per chunk of a document, in document order:
    doc     string          document name (`austen/emma`; a held-out tail is `<name>#tail`)
    chunk   int32           0, 1, ... within the document
    tokens  list<int32>     token ids; every document's last chunk ends with the EOS id

A split's token stream is the concatenation of the `tokens` of its shards in manifest order.
Training windows (`rayq.batches`) are fixed-length slices of that stream: window i covers tokens
[i*T, i*T + T + 1), x = its first T tokens, y = its last T; `TokenStream` visits the windows in
a seeded random order per epoch and keeps its position in a `state_dict()` for exact resume.
With `data.bos` every packed sequence starts with the tokenizer's BOS id: window i covers
[i*T, i*T + T), y = those T tokens, x = BOS followed by the first T - 1 of them. The setting is
part of the cache key and the manifest, so whoever reads the prepared data (the evaluator, a
later `rayq eval`) cuts its windows the way training did.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm

from rayq.config import atomic_write_bytes, atomic_write_text
from rayq.corpus import Document, load_documents
from rayq.errors import UserError, did_you_mean
from rayq.schema import DataConfig

__all__ = [
    "SCHEMA_VERSION",
    "PreparedData",
    "prepare",
    "prepare_key",
    "reuse_or_prepare",
    "read_tokens",
    "tokens_from_arrow",
    "SPM_BOS_ID",
]

SCHEMA_VERSION = 1
TRAIN, HELDOUT = "train", "heldout"
TAIL_SUFFIX = "#tail"  # name of the held-out tail of a document (data.heldout_fraction)
_ROW_TOKENS = 16384  # tokens per Parquet row: small enough to slice, large enough to be cheap
_SPM_THREADS = 4  # fixed: SentencePiece's trained model depends on its thread count
SPM_BOS_ID = 1  # set explicitly when training the tokenizer (Ray Data workers cut windows without its model)
_SPM_MAX_LINE = 4000  # SentencePiece skips training sentences longer than max_sentence_length
_STALE_TMP_SECONDS = 6 * 3600  # temp dirs of killed prepares older than this are removed

Progress = Optional[Callable[[str], None]]


def _shard_schema():
    return pa.schema([("doc", pa.string()), ("chunk", pa.int32()), ("tokens", pa.list_(pa.int32()))])


# ============================================================================ hashing


def _relevant_config(data_cfg: DataConfig, vocab_size: int) -> dict:
    """Config fields that change the prepared output (not cache_dir, not seq_len: windows are
    cut at batch time, so one prepared copy serves every context length)."""
    d = asdict(data_cfg)
    d.pop("cache_dir")
    d.pop("sources")  # the documents themselves are hashed instead of where they came from
    d.pop("loader")  # how workers read the shards, not what is in them
    return {"vocab_size": vocab_size, "data": d, "schema_version": SCHEMA_VERSION}


def prepare_key(data_cfg: DataConfig, vocab_size: int, docs: list[Document]) -> str:
    """Content hash of the documents (names and texts, in order) and the relevant config."""
    h = hashlib.sha256(json.dumps(_relevant_config(data_cfg, vocab_size), sort_keys=True).encode())
    for doc in docs:
        h.update(doc.name.encode() + b"\0" + doc.text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


# ============================================================================ splitting


def _split_documents(data_cfg: DataConfig, docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, heldout): named documents held out whole, plus the tail of every other document
    when heldout_fraction > 0 (cut at a line boundary so the raw text stays readable)."""
    names = [d.name for d in docs]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"data: duplicate document name {name!r}")
        seen.add(name)
    for name in data_cfg.heldout_documents:
        if name not in seen:
            raise UserError(f"data.heldout_documents: no document named {name!r}{did_you_mean(name, names, cutoff=0.3)}")
    held = set(data_cfg.heldout_documents)
    train, heldout = [], []
    for doc in docs:
        if doc.name in held:
            heldout.append(doc)
            continue
        frac = data_cfg.heldout_fraction
        if frac > 0 and len(doc.text) > 1:
            cut = int(len(doc.text) * (1 - frac))
            nl = doc.text.rfind("\n", 0, cut)
            cut = nl + 1 if nl > 0 else cut
            if 0 < cut < len(doc.text):
                train.append(Document(doc.name, doc.text[:cut]))
                heldout.append(Document(doc.name + TAIL_SUFFIX, doc.text[cut:]))
                continue
        train.append(doc)
    if not train:
        raise UserError("data: every document is held out; nothing is left to train on")
    return train, heldout


# ============================================================================ tokenizer


def _training_lines(docs: list[Document], budget: int) -> list[str]:
    """At most `budget` characters of lines, sampled with a fixed seed, kept in corpus order."""
    lines: list[str] = []
    for doc in docs:
        for line in doc.text.split("\n"):
            while len(line) > _SPM_MAX_LINE:  # split long paragraphs at a space
                cut = line.rfind(" ", 0, _SPM_MAX_LINE)
                cut = cut if cut > 0 else _SPM_MAX_LINE
                lines.append(line[:cut])
                line = line[cut:].lstrip(" ")
            if line.strip():
                lines.append(line)
    total = sum(len(s) for s in lines)
    if total <= budget:
        return lines
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)
    keep, used = [], 0
    for i in order:
        if used >= budget:
            break
        keep.append(i)
        used += len(lines[i])
    return [lines[i] for i in sorted(keep)]


def train_tokenizer(docs: list[Document], vocab_size: int, model_type: str, max_chars: int) -> bytes:
    """A SentencePiece model (serialized) trained on `docs`; deterministic for the same inputs.

    Byte fallback makes every string encodable; "\\n" is a piece of its own (documents keep their
    line structure) and whitespace runs are kept, so decode(encode(text)) is the text up to NFKC.
    """

    lines = _training_lines(docs, max_chars)
    if not lines:
        raise UserError("data: the training documents contain no text to train a tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            unk_id=0, bos_id=SPM_BOS_ID, eos_id=2, pad_id=-1,
            user_defined_symbols=["\n"],
            remove_extra_whitespaces=False,
            split_digits=True,
            input_sentence_size=0,  # we sampled already: use every line we give, in order
            shuffle_input_sentence=False,
            max_sentence_length=_SPM_MAX_LINE * 4 + 16,  # bytes
            hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked
            num_threads=_SPM_THREADS,
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.vocab_size={vocab_size}: SentencePiece could not train a {model_type} tokenizer ({msg}); "
            "byte fallback needs vocab_size >= 300, and a large vocabulary needs more text"
        ) from None
    return model.getvalue()


# ============================================================================ shards


def _write_split(sp, docs: list[Document], out_dir: Path, shard_tokens: int, cap: Optional[int],
                 progress: Progress) -> dict:
    """Encode `docs` into Parquet shards under out_dir; returns the manifest entry of the split."""

    out_dir.mkdir(parents=True, exist_ok=True)
    schema = _shard_schema()
    row_tokens = min(_ROW_TOKENS, shard_tokens)
    eos = sp.eos_id()
    shards: list[dict] = []
    rows: dict[str, list] = {"doc": [], "chunk": [], "tokens": []}
    in_shard, total, n_docs = 0, 0, 0

    def flush() -> None:
        nonlocal rows, in_shard
        if not rows["doc"]:
            return
        rel = f"{out_dir.name}/{len(shards):05d}.parquet"
        table = pa.table(
            {"doc": rows["doc"], "chunk": pa.array(rows["chunk"], pa.int32()),
             "tokens": pa.array(rows["tokens"], pa.list_(pa.int32()))},
            schema=schema,
        )
        pq.write_table(table, out_dir.parent / rel, compression="zstd")
        shards.append({"path": rel, "rows": table.num_rows, "tokens": in_shard})
        rows = {"doc": [], "chunk": [], "tokens": []}
        in_shard = 0

    last_report = time.monotonic()
    batch = 64  # documents per encode call: SentencePiece encodes a list on several threads
    for start in range(0, len(docs), batch):
        group = docs[start : start + batch]
        for doc, ids in zip(group, sp.encode([d.text for d in group], num_threads=_SPM_THREADS)):
            ids = np.asarray(ids + [eos], dtype=np.int32)
            if cap is not None:
                ids = ids[: max(0, cap - total)]
            if len(ids) == 0:
                continue
            n_docs += 1
            for chunk, lo in enumerate(range(0, len(ids), row_tokens)):
                piece = ids[lo : lo + row_tokens]
                rows["doc"].append(doc.name)
                rows["chunk"].append(chunk)
                rows["tokens"].append(piece)
                in_shard += len(piece)
                total += len(piece)
                if in_shard >= shard_tokens:
                    flush()
        done = min(start + batch, len(docs))
        if progress is not None and (time.monotonic() - last_report > 2 or done == len(docs)):
            last_report = time.monotonic()  # throttled: a corpus of small documents has many batches
            progress(f"  {out_dir.name}: {done:,}/{len(docs):,} documents, {total:,} tokens")
        if cap is not None and total >= cap:
            break
    flush()
    return {"tokens": total, "documents": n_docs, "shards": shards}


def read_tokens(files: Iterable[str | os.PathLike]) -> np.ndarray:
    """The concatenated token stream (int32) of Parquet shards, in the order given."""

    parts = [tokens_from_arrow(pq.read_table(f, columns=["tokens"])) for f in files]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def tokens_from_arrow(table) -> np.ndarray:
    """The token stream of a pyarrow Table with a `tokens` list<int32> column (as read by
    pyarrow or handed out by Ray Data's `iter_batches(batch_format="pyarrow")`)."""
    col = table.column("tokens")
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in col.chunks]
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, dtype=np.int32)


# ============================================================================ prepared data


class PreparedData:
    """A prepared directory: tokenizer, token shards per split, held-out raw texts."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a prepared data manifest ({exc}); run rayq data prepare") from None
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: schema version {self.manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
        self._sp = None
        self._tokens: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"PreparedData({str(self.root)!r})"

    @property
    def key(self) -> str:
        return self.manifest["key"]

    # ------------------------------------------------------------------ tokenizer
    def tokenizer(self):
        """The SentencePieceProcessor (loaded once)."""
        if self._sp is None:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.root / self.manifest["tokenizer"]["path"]))
        return self._sp

    @property
    def vocab_size(self) -> int:
        """Pieces in the tokenizer (<= model.vocab_size: a small corpus may support fewer)."""
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def window_bos(self) -> Optional[int]:
        """The BOS id every packed sequence starts with (prepared with data.bos), else None."""
        if not self.manifest["config"]["data"].get("bos", False):
            return None
        return int(self.manifest["tokenizer"]["bos_id"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer().encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer().decode([int(i) for i in ids])

    # ------------------------------------------------------------------ splits
    def files(self, split: str = TRAIN) -> list[str]:
        """Absolute paths of a split's Parquet shards, in stream order."""
        if split not in self.manifest["splits"]:
            raise UserError(f"unknown split {split!r} (have: {', '.join(self.manifest['splits'])})")
        return [str(self.root / s["path"]) for s in self.manifest["splits"][split]["shards"]]

    def train_files(self) -> list[str]:
        """The train split's Parquet files, e.g. for `ray.data.read_parquet(files)`."""
        return self.files(TRAIN)

    def num_tokens(self, split: str = TRAIN) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def tokens(self, split: str = TRAIN) -> np.ndarray:
        """The split's whole token stream as int32 (read once, then cached)."""
        if split not in self._tokens:
            self._tokens[split] = read_tokens(self.files(split))
        return self._tokens[split]

    def heldout_texts(self) -> dict[str, str]:
        """Raw text of each held-out document (whole documents, and `<name>#tail` parts)."""
        out = {}
        with open(self.root / "heldout_texts.jsonl", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                out[row["name"]] = row["text"]
        return out

    def summary(self) -> dict:
        m = self.manifest
        return {
            "dir": str(self.root),
            "key": m["key"],
            "vocab_size": m["tokenizer"]["vocab_size"],
            "tokenizer": m["tokenizer"]["type"],
            "documents": m["inputs"]["documents"],
            "chars": m["inputs"]["chars"],
            "splits": {k: {"tokens": v["tokens"], "documents": v["documents"], "shards": len(v["shards"])}
                       for k, v in m["splits"].items()},
            "heldout_documents": m["heldout_documents"],
            "seconds": m.get("seconds", {}),
        }


RUN_TOKENIZER = "tokenizer.model"  # the copy a run directory carries (`copy_tokenizer`)


def copy_tokenizer(data: PreparedData, run_dir: str | os.PathLike) -> Path:
    """Copy the tokenizer into a run directory as `tokenizer.model`, so its checkpoints can be
    evaluated where the prepared data (a cache under data.cache_dir) does not exist."""
    dest = Path(run_dir) / RUN_TOKENIZER
    model = (data.root / data.manifest["tokenizer"]["path"]).read_bytes()
    if not dest.is_file() or dest.read_bytes() != model:
        atomic_write_bytes(dest, model)
    return dest


def reuse_or_prepare(data_dir: Optional[str | os.PathLike], data_cfg: DataConfig, vocab_size: int) -> PreparedData:
    """The prepared data where another process (a Ray driver) prepared it, when this process can
    see that directory (one machine, a shared filesystem); otherwise prepared here (cached by
    content hash on this node)."""
    if data_dir and _is_complete(Path(data_dir)):
        return PreparedData(data_dir)
    return prepare(data_cfg, vocab_size)


def _is_complete(root: Path) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    paths = [manifest["tokenizer"]["path"], "heldout_texts.jsonl"]
    paths += [s["path"] for split in manifest["splits"].values() for s in split["shards"]]
    return manifest.get("schema_version") == SCHEMA_VERSION and all((root / p).is_file() for p in paths)


def _remove_stale_tmp(prepared_dir: Path) -> None:
    now = time.time()
    for tmp in prepared_dir.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def prepare(data_cfg: DataConfig, vocab_size: int, *, progress: Progress = None,
            documents: Optional[list[Document]] = None) -> PreparedData:
    """Documents of `data_cfg` -> a `vocab_size` tokenizer + token shards + held-out split, cached
    by content hash (`model.vocab_size` is the one field outside `data` that changes the output).

    Returns the cached copy when one exists for the same inputs. `documents` overrides the
    documents `data_cfg` names (tests, callers that already hold them).
    """
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    docs = documents if documents is not None else load_documents(data_cfg, progress=progress)
    if not docs:
        raise UserError("data.sources: no documents found")
    train_docs, heldout_docs = _split_documents(data_cfg, docs)
    key = prepare_key(data_cfg, vocab_size, docs)
    prepared_dir = Path(data_cfg.cache_dir).expanduser() / "prepared"
    root = prepared_dir / key
    if _is_complete(root):
        say(f"reusing prepared data {root}")
        return PreparedData(root)
    t_docs = time.perf_counter() - t0

    prepared_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(prepared_dir)
    tmp = prepared_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(data_cfg, vocab_size, key, docs, train_docs, heldout_docs, tmp, say, t_docs)
        if root.exists():  # an incomplete copy (files deleted by hand) or a racing builder
            if _is_complete(root):
                shutil.rmtree(tmp, ignore_errors=True)
                return PreparedData(root)
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)  # atomic: readers see no directory or a complete one
        except OSError:
            if not _is_complete(root):  # lost a race to another builder: theirs is as good as ours
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"prepared data in {root} ({time.perf_counter() - t0:.1f} s)")
    return PreparedData(root)


def _build(data_cfg: DataConfig, vocab_size: int, key: str, docs, train_docs, heldout_docs, out: Path, say,
           t_docs: float) -> None:
    times = {"documents": round(t_docs, 3)}
    t = time.perf_counter()
    budget = data_cfg.tokenizer_train_chars
    say(f"training a {data_cfg.tokenizer} tokenizer (vocab {vocab_size}) on <= {budget:,} characters")
    model = train_tokenizer(train_docs, vocab_size, data_cfg.tokenizer, budget)
    (out / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.vocab_size() < vocab_size:
        say(f"note: the corpus supports {sp.vocab_size():,} tokenizer pieces, fewer than model.vocab_size="
            f"{vocab_size:,}; the extra embedding rows stay unused")
    times["tokenizer"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    say(f"encoding {len(train_docs)} train and {len(heldout_docs)} held-out documents")
    splits = {
        TRAIN: _write_split(sp, train_docs, out / TRAIN, data_cfg.shard_tokens, data_cfg.max_train_tokens, say),
        HELDOUT: _write_split(sp, heldout_docs, out / HELDOUT, data_cfg.shard_tokens, None, say),
    }
    times["encode"] = round(time.perf_counter() - t, 3)
    with open(out / "heldout_texts.jsonl", "w", encoding="utf-8") as fh:
        for doc in heldout_docs:
            fh.write(json.dumps({"name": doc.name, "text": doc.text}) + "\n")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {
            "documents": len(docs),
            "chars": sum(len(d.text) for d in docs),
            "sources": list(data_cfg.sources) or ["embedded"],
        },
        "config": _relevant_config(data_cfg, vocab_size),
        "tokenizer": {
            "path": "tokenizer.model",
            "type": data_cfg.tokenizer,
            "vocab_size": sp.vocab_size(),
            "requested_vocab_size": vocab_size,
            "eos_id": sp.eos_id(),
            "bos_id": sp.bos_id(),
            "unk_id": sp.unk_id(),
            "byte_fallback": True,
        },
        "shard_schema": {"doc": "string", "chunk": "int32", "tokens": "list<int32>"},
        "splits": splits,
        "heldout_documents": [d.name for d in heldout_docs],
        "seconds": times,
    }
    # The manifest is written last: its presence is what marks a complete directory.
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
