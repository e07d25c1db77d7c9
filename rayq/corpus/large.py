"""`data.corpus: large`: the default corpus plus the other real English text Debian packages hold.

What `apt-get download` gets (Debian bookworm), and each text's licence (from the package's
`copyright` file; the packages are fetched at run time into the cache, never redistributed):

| package             | text                                        | licence            | ~words | tokens* |
|---------------------|---------------------------------------------|--------------------|--------|---------|
| dict-gcide          | GNU Collaborative International Dictionary  | GPL-2+ (its Webster| 5.0M   | 13.1M   |
|                     | of English (Webster 1913 + later additions) | 1913 core: PD)     |        |         |
| wordnet-base        | WordNet 3.0 synset glosses and examples     | WordNet 3.0 (BSD-  | 1.7M   | 4.4M    |
|                     |                                             | like, attribution) |        |         |
| sword-comm-tdavid   | C. H. Spurgeon, The Treasury of David       | public domain      | 2.1M   | 3.8M    |
| dict-foldoc         | Free On-line Dictionary of Computing        | GFDL-1.1+          | 0.76M  | 2.1M    |
| sword-comm-mhcc     | Matthew Henry's Concise Commentary          | public domain      | 0.71M  | 1.2M    |
| dict-jargon         | The Jargon File 4.4.7                       | public domain      | 0.21M  | 0.52M   |
| sword-comm-scofield | Scofield Reference Notes (1917)             | public domain      | 0.13M  | 0.33M   |
| debian-reference-en | Debian Reference (plain-text build)         | GPL-2+             | 0.06M  | 0.18M   |
| dict-devil          | Ambrose Bierce, The Devil's Dictionary      | public domain      | 0.06M  | 0.13M   |

*tokens with the `proxy` preset's 2048-piece tokenizer; with the default corpus (3.9M tokens) the
large corpus is 29.6M train tokens, 44% of them GCIDE (measured 2026-12).

Left out on purpose: `sword-text-kjv` (the same King James text as `bible-kjv-text`: a second
copy would hide repetition), `sword-dict-naves` (mostly verse references), fortune files (short,
partly offensive). Each source's document names start with its short name (`gcide/a`,
`wordnet/noun`, `mhcc/ot`); the default corpus' names are unchanged, so `austen/emma` stays the
held-out document. Formats, read in Python without dictd, WordNet or SWORD libraries:

- dictd (`*.dict.dz` is gzip; `*.index` lines are `headword TAB offset TAB length`, base64 digits):
  entries cut at the index offsets, metadata entries (`00-database-*`) dropped, source tags like
  `[1913 Webster]` dropped, hard-wrapped lines joined into one paragraph per line.
- WordNet `data.<pos>`: `offset lex type count word ... | gloss`: one "words: gloss" line per synset.
- SWORD zCom / zCom4 commentaries: the zText layout of `embedded.web_documents` (block records
  `*.?zs`, zlib blocks `*.?zz`, verse records `*.?zv` of 10 bytes, or 12 with zCom4), OSIS inside.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import zlib
from pathlib import Path

from rayq.corpus.document import Document
from rayq.corpus.embedded import (
    _deb_files,
    _osis_to_text,
    _paragraphs,
    _read_jsonl_docs,
    embedded_documents,
    fetch_debs,
)
from rayq.errors import UserError

__all__ = ["LARGE_PACKAGES", "LARGE_VERSION", "large_documents", "large_extra_documents", "dictd_documents",
           "wordnet_documents", "debian_reference_documents", "sword_commentary_documents"]

# package -> short name used as the documents' name prefix
DICTD = {"dict-gcide": "gcide", "dict-foldoc": "foldoc", "dict-jargon": "jargon", "dict-devil": "devil"}
COMMENTARIES = {"sword-comm-mhcc": "mhcc", "sword-comm-tdavid": "tdavid", "sword-comm-scofield": "scofield"}
LARGE_PACKAGES = (*DICTD, "wordnet-base", "debian-reference-en", *COMMENTARIES)
# Bump when the cleaning changes: the cached jsonl (and so every prepared-data hash) moves.
LARGE_VERSION = 2

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SOURCE_TAG = re.compile(r"^\s*\[(?:1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.|[A-Z][\w .]{0,30})\]\s*$")
# GCIDE's provenance tags also stand inside paragraphs: `... symbols. [1913 Webster] This letter ...`
_INLINE_TAG = re.compile(r" ?\[(?:1913 Webster|PJC|WordNet 1\.5(?: \+PJC)?|Century Dict\.|Webster 1913 Suppl\.)\]")


def _b64_number(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def dictd_documents(deb: Path, short: str) -> list[Document]:
    """A dictd dictionary: one document per initial letter (`gcide/a`, ..., `gcide/other`), one
    paragraph of an entry per line, entries in dictionary order."""
    files = _deb_files(deb, [f"/{short}.dict.dz", f"/{short}.index"])
    body = next(v for k, v in files.items() if k.endswith(".dict.dz"))
    index = next(v for k, v in files.items() if k.endswith(".index"))
    raw = gzip.decompress(body)  # dictzip is gzip with a random-access table in the header
    spans: dict[int, tuple[int, str]] = {}
    for line in index.decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00"):
            continue
        offset, length = _b64_number(parts[1]), _b64_number(parts[2])
        spans.setdefault(offset, (length, parts[0]))  # several headwords may share one entry
    if not spans:
        raise UserError(f"{deb}: no entries in {short}.index")
    letters: dict[str, list[str]] = {}
    for offset in sorted(spans):
        length, head = spans[offset]
        text = raw[offset : offset + length].decode("utf-8", "replace")
        text = re.sub(r"\{([^{}]*)\}", r"\1", text)  # cross-reference braces: keep the words
        lines = [line for line in text.split("\n") if not _SOURCE_TAG.match(line)]
        first = head[:1].lower()
        letter = first if "a" <= first <= "z" else "other"
        text = _INLINE_TAG.sub("", re.sub(r"[ \t]{2,}", " ", _paragraphs(lines)))  # and alignment runs
        letters.setdefault(letter, []).append(text)
    return [Document(f"{short}/{k}", "".join(v)) for k, v in sorted(letters.items())]


def wordnet_documents(deb: Path) -> list[Document]:
    """WordNet glosses: one document per part of speech, one `words: gloss` line per synset."""
    files = _deb_files(deb, [f"/wordnet/data.{pos}" for pos in ("noun", "verb", "adj", "adv")])
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        raw = next(v for k, v in files.items() if k.endswith(f"/data.{pos}")).decode("utf-8", "replace")
        out = []
        for line in raw.splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header is indented
                continue
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]  # adjective markers like (a)
            out.append(f"{', '.join(words)}: {gloss.strip()}")
        docs.append(Document(f"wordnet/{pos}", "\n".join(out) + "\n"))
    return docs


def debian_reference_documents(deb: Path) -> list[Document]:
    """The Debian Reference's plain-text build, tables dropped, one paragraph per line."""
    raw = next(iter(_deb_files(deb, ["/debian-reference.en.txt.gz"]).values()))
    lines = gzip.decompress(raw).decode("utf-8", "replace").splitlines()
    kept = [line for line in lines if not re.match(r"^\s*[|+][-+=|]*", line)]  # table rows and rules
    return [Document("debian-reference/en", _paragraphs(kept))]


def _zcom_records(index: bytes, blocks: list[bytes]) -> list[tuple[int, int, int]]:
    """Verse records (block, start, length): 10 bytes each (zCom) or 12 (zCom4), whichever fits."""
    for size, fmt in ((10, "<IIH"), (12, "<III")):
        if len(index) % size:
            continue
        records = list(struct.iter_unpack(fmt, index))
        if all(length == 0 or (b < len(blocks) and s + length <= len(blocks[b])) for b, s, length in records):
            return records
    raise UserError("SWORD commentary: verse index matches neither the zCom nor the zCom4 layout")


def sword_commentary_documents(deb: Path, short: str) -> list[Document]:
    """A SWORD commentary: one document per testament (`mhcc/ot`, `mhcc/nt`), one paragraph per line."""
    files = _deb_files(deb, [f"/{short}/{t}.{k}{e}" for t in ("ot", "nt") for k in "bc" for e in ("zs", "zz", "zv")])
    docs = []
    for testament in ("ot", "nt"):
        found = {k.rsplit(".", 1)[1][1:]: v for k, v in files.items() if f"/{short}/{testament}." in k}
        if not found.get("zs"):
            continue  # a commentary on one testament only (Spurgeon's is on the Psalms)
        blocks = []
        for offset, csize, _usize in struct.iter_unpack("<III", found["zs"]):
            blocks.append(zlib.decompress(found["zz"][offset : offset + csize]) if csize else b"")
        parts, last = [], None
        for block, start, length in _zcom_records(found["zv"], blocks):
            entry = (block, start, length)
            if length and entry != last:  # linked verses repeat the same entry
                parts.append(blocks[block][start : start + length].decode("utf-8", "replace"))
            last = entry
        text = _osis_to_text("\n".join(parts))
        if text.strip():
            docs.append(Document(f"{short}/{testament}", text))
    if not docs:
        raise UserError(f"{deb}: no commentary text found for {short}")
    return docs


def large_extra_documents(deb_dir: Path, progress=None) -> list[Document]:
    """The documents `data.corpus: large` adds to the default corpus (fetched into `deb_dir`)."""
    say = progress or (lambda msg: None)
    say(f"fetching {', '.join(LARGE_PACKAGES)} with apt-get download into {deb_dir}")
    debs = fetch_debs(deb_dir, LARGE_PACKAGES)
    docs: list[Document] = []
    for package, short in DICTD.items():
        say(f"cleaning {package}")
        docs += dictd_documents(debs[package], short)
    say("cleaning wordnet-base, debian-reference-en")
    docs += wordnet_documents(debs["wordnet-base"]) + debian_reference_documents(debs["debian-reference-en"])
    for package, short in COMMENTARIES.items():
        say(f"cleaning {package}")
        docs += sword_commentary_documents(debs[package], short)
    return docs


def large_documents(cache_dir: str | os.PathLike, progress=None) -> list[Document]:
    """The default corpus followed by the extra documents, cleaned once into `cache_dir/corpus/`."""
    from rayq.config import atomic_write_text

    docs = embedded_documents(cache_dir, progress=progress)
    corpus_dir = Path(cache_dir).expanduser() / "corpus"
    cached = corpus_dir / f"large-extra-v{LARGE_VERSION}.jsonl"
    if cached.is_file():
        return docs + _read_jsonl_docs(cached)
    extra = large_extra_documents(corpus_dir / "debs", progress)
    atomic_write_text(cached, "".join(json.dumps({"name": d.name, "text": d.text}) + "\n" for d in extra))
    return docs + extra
