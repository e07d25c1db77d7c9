"""The embedded default corpus: public-domain books from Debian packages, parsed in Python.

The corpus is fetched without root: `apt-get download` needs only the package lists, and the
`.deb` files are unpacked here (ar archive -> data.tar.* via `tarfile`), so no `dpkg`, R or
SWORD library is needed. The three formats are small enough to read directly:

- `bible-kjv-text`: Chip Chapin's "EC02" windowed file: 64 KiB windows, each compressed with
  unix `compress` LZW (16 bits, block mode); lines are `Ge1:1 In the beginning ...`.
- `r-cran-janeaustenr`: R lazy-load data: `Rdata.rdx` (gzip XDR serialization of the index)
  points at slices of `Rdata.rdb` (4-byte big-endian length + zlib) holding character vectors.
- `sword-text-web`: SWORD zText: `.bzs` 12-byte (offset, csize, usize) block records, `.bzz`
  zlib blocks, `.bzv` 10-byte (block, start, length) verse records; OSIS markup inside.

Cleaned text has one paragraph (a verse, a novel's paragraph, a poetry line) per line.
"""

from __future__ import annotations

import gzip
import html
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Iterable

from rayq.corpus.document import Document
from rayq.errors import UserError

__all__ = ["EMBEDDED_PACKAGES", "EMBEDDED_VERSION", "embedded_documents", "kjv_documents",
           "austen_documents", "web_documents"]

EMBEDDED_PACKAGES = ("bible-kjv-text", "r-cran-janeaustenr", "sword-text-web")
# Bump when the cleaning changes: the cached jsonl (and therefore every prepared-data hash) moves.
EMBEDDED_VERSION = 1


# ============================================================================ Debian packages


def _deb_data_members(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened with tarfile."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise UserError(f"{deb}: not a Debian package (bad ar magic); delete it and fetch again")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)  # ar members are padded to even offsets
    raise UserError(f"{deb}: no data.tar member; delete it and fetch again")


def _deb_files(deb: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """Files from a .deb whose path ends with one of `wanted` (suffix match)."""
    wanted = tuple(wanted)
    out: dict[str, bytes] = {}
    with _deb_data_members(deb) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(wanted):
                out[member.name] = tar.extractfile(member).read()
    return out


def fetch_debs(deb_dir: Path, packages: Iterable[str] = EMBEDDED_PACKAGES) -> dict[str, Path]:
    """Download the packages into `deb_dir` (once) and return package -> .deb path."""
    packages = tuple(packages)
    deb_dir.mkdir(parents=True, exist_ok=True)

    def found() -> dict[str, Path]:
        hits = {p: sorted(deb_dir.glob(f"{p}_*.deb")) for p in packages}
        return {p: h[-1] for p, h in hits.items() if h}

    have = found()
    missing = [p for p in packages if p not in have]
    if not missing:
        return have
    command = f"cd {deb_dir} && apt-get download {' '.join(packages)}"
    hint = f"run by hand: {command}  (or set data.sources to your own text files)"
    if shutil.which("apt-get") is None:
        raise UserError(f"embedded corpus: apt-get not found, cannot fetch {', '.join(missing)}; {hint}")
    proc = subprocess.run(
        ["apt-get", "download", *missing], cwd=deb_dir, capture_output=True, text=True, timeout=600
    )
    have = found()
    still = [p for p in packages if p not in have]
    if proc.returncode != 0 or still:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        why = err[-1] if err else f"exit code {proc.returncode}"
        raise UserError(f"embedded corpus: apt-get download failed ({why}); {hint}")
    return have


# ============================================================================ King James Bible

# (KJV file abbreviation, OSIS id, stable slug) in canonical order.
BOOKS = [
    ("Ge", "Gen", "genesis"), ("Exo", "Exod", "exodus"), ("Lev", "Lev", "leviticus"),
    ("Num", "Num", "numbers"), ("Deu", "Deut", "deuteronomy"), ("Josh", "Josh", "joshua"),
    ("Jdgs", "Judg", "judges"), ("Ruth", "Ruth", "ruth"), ("1Sm", "1Sam", "1-samuel"),
    ("2Sm", "2Sam", "2-samuel"), ("1Ki", "1Kgs", "1-kings"), ("2Ki", "2Kgs", "2-kings"),
    ("1Chr", "1Chr", "1-chronicles"), ("2Chr", "2Chr", "2-chronicles"), ("Ezra", "Ezra", "ezra"),
    ("Neh", "Neh", "nehemiah"), ("Est", "Esth", "esther"), ("Job", "Job", "job"),
    ("Psa", "Ps", "psalms"), ("Prv", "Prov", "proverbs"), ("Eccl", "Eccl", "ecclesiastes"),
    ("SSol", "Song", "song-of-solomon"), ("Isa", "Isa", "isaiah"), ("Jer", "Jer", "jeremiah"),
    ("Lam", "Lam", "lamentations"), ("Eze", "Ezek", "ezekiel"), ("Dan", "Dan", "daniel"),
    ("Hos", "Hos", "hosea"), ("Joel", "Joel", "joel"), ("Amos", "Amos", "amos"),
    ("Obad", "Obad", "obadiah"), ("Jonah", "Jonah", "jonah"), ("Mic", "Mic", "micah"),
    ("Nahum", "Nah", "nahum"), ("Hab", "Hab", "habakkuk"), ("Zep", "Zeph", "zephaniah"),
    ("Hag", "Hag", "haggai"), ("Zec", "Zech", "zechariah"), ("Mal", "Mal", "malachi"),
    ("Mat", "Matt", "matthew"), ("Mark", "Mark", "mark"), ("Luke", "Luke", "luke"),
    ("John", "John", "john"), ("Acts", "Acts", "acts"), ("Rom", "Rom", "romans"),
    ("1Cor", "1Cor", "1-corinthians"), ("2Cor", "2Cor", "2-corinthians"), ("Gal", "Gal", "galatians"),
    ("Eph", "Eph", "ephesians"), ("Phi", "Phil", "philippians"), ("Col", "Col", "colossians"),
    ("1Th", "1Thess", "1-thessalonians"), ("2Th", "2Thess", "2-thessalonians"),
    ("1Tim", "1Tim", "1-timothy"), ("2Tim", "2Tim", "2-timothy"), ("Titus", "Titus", "titus"),
    ("Phmn", "Phlm", "philemon"), ("Heb", "Heb", "hebrews"), ("Jas", "Jas", "james"),
    ("1Pet", "1Pet", "1-peter"), ("2Pet", "2Pet", "2-peter"), ("1Jn", "1John", "1-john"),
    ("2Jn", "2John", "2-john"), ("3Jn", "3John", "3-john"), ("Jude", "Jude", "jude"),
    ("Rev", "Rev", "revelation"),
]  # fmt: skip
# The World English Bible adds the deuterocanon; OSIS ids not listed here fall back to lowercase.
DEUTERO_SLUGS = {
    "Tob": "tobit", "Jdt": "judith", "EsthGr": "greek-esther", "Wis": "wisdom", "Sir": "sirach",
    "Bar": "baruch", "DanGr": "greek-daniel", "PrMan": "prayer-of-manasseh", "AddPs": "psalm-151",
    "1Esd": "1-esdras", "2Esd": "2-esdras", "1Macc": "1-maccabees", "2Macc": "2-maccabees",
    "3Macc": "3-maccabees", "4Macc": "4-maccabees",
}  # fmt: skip


def _lzw_decompress(data: bytes, maxbits: int = 16) -> bytes:
    """Unix `compress` LZW, block mode, no header -- a port of the BRS compresslib.c decoder.

    Like the original, codes are read in groups of n_bits bytes, and the rest of a group is
    discarded when the code width changes or the table is cleared (the quirk that makes plain
    bit-stream LZW decoders fail on .Z data).
    """
    out = bytearray()
    prefix = [0] * (1 << maxbits)
    suffix = bytearray(1 << maxbits)
    suffix[:256] = bytes(range(256))
    maxmaxcode = 1 << maxbits
    n_bits, maxcode, free_ent = 9, (1 << 9) - 1, 257
    pos, end, group, offset, size, clear = 0, len(data), 0, 0, 0, False

    def getcode() -> int:
        nonlocal n_bits, maxcode, pos, group, offset, size, clear
        if clear or offset >= size or free_ent > maxcode:
            if free_ent > maxcode:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
            if clear:
                n_bits, maxcode, clear = 9, (1 << 9) - 1, False
            size = min(n_bits, end - pos)
            if size <= 0:
                return -1
            group = int.from_bytes(data[pos : pos + size], "little")
            pos += size
            offset = 0
            size = (size << 3) - (n_bits - 1)
        code = (group >> offset) & ((1 << n_bits) - 1)
        offset += n_bits
        return code

    finchar = oldcode = getcode()
    if oldcode < 0:
        return b""
    out.append(finchar)
    while (code := getcode()) >= 0:
        if code == 256:  # CLEAR
            clear, free_ent = True, 256
            if (code := getcode()) < 0:
                break
        incode = code
        stack = bytearray()
        if code >= free_ent:  # the KwKwK case
            stack.append(finchar)
            code = oldcode
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        finchar = suffix[code]
        stack.append(finchar)
        stack.reverse()
        out += stack
        if free_ent < maxmaxcode:
            prefix[free_ent], suffix[free_ent] = oldcode, finchar
            free_ent += 1
        oldcode = incode
    return bytes(out)


def kjv_documents(deb: Path) -> list[Document]:
    """King James Bible: one document per book, one verse per line, verse numbers stripped."""
    raw = next(iter(_deb_files(deb, ["/bible.data"]).values()))
    if raw[:4] != b"EC02":
        raise UserError(f"{deb}: unexpected bible.data format {raw[:4]!r}")
    wsize, wnum = struct.unpack(">II", raw[84:92])
    table = struct.unpack(f">{wnum + 1}I", raw[92 : 92 + 4 * (wnum + 1)])
    # The window table already points past the 3-byte `compress` header (1f 9d 90) before window 0.
    text = b"".join(_lzw_decompress(raw[table[i] : table[i + 1]]) for i in range(wnum)).decode("latin-1")
    slug = {abbr: s for abbr, _, s in BOOKS}
    verses: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([1-3]?[A-Za-z]+)\d+:\d+ (.*)$", line)
        if m and m.group(1) in slug:
            verses.setdefault(slug[m.group(1)], []).append(m.group(2).strip())
    if len(verses) != len(BOOKS):
        raise UserError(f"{deb}: found {len(verses)} books in bible.data, expected {len(BOOKS)}")
    return [Document(f"kjv/{s}", "\n".join(verses[s]) + "\n") for _, _, s in BOOKS]


# ============================================================================ Jane Austen (R data)

AUSTEN_SLUGS = {
    "emma": "emma", "mansfieldpark": "mansfield-park", "northangerabbey": "northanger-abbey",
    "persuasion": "persuasion", "prideprejudice": "pride-and-prejudice",
    "sensesensibility": "sense-and-sensibility",
}  # fmt: skip


class _RdsReader:
    """Just enough of R's XDR serialization (format 2/3) to read character vectors and the
    lazy-load index: NULL, symbols, pairlists, CHARSXP, logical/int/real/string/generic vectors,
    references. Anything else is reported as unsupported rather than guessed."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            n = self.int()  # native encoding name (read n first: `pos += int()` would use the old pos)
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def read(self):
        flags = self.int()
        sxp, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if sxp == 254:  # NILVALUE_SXP
            return None
        if sxp == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if sxp == 1:  # SYMSXP
            sym = self.read()
            self.refs.append(sym)
            return sym
        if sxp == 2:  # LISTSXP: attributes, tag, car, cdr
            items = {}
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                items[tag if tag is not None else len(items)] = self.read()
                flags = self.int()
                if flags & 0xFF != 2:
                    self.pos -= 4
                    self.read()  # terminating NULL
                    return items
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if sxp == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.data[self.pos : self.pos + n]
            self.pos += n
            return s.decode("latin-1" if flags & (1 << 14) else "utf-8")
        if sxp in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            vals = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif sxp == 14:  # REALSXP
            n = self.int()
            vals = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif sxp in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            vals = [self.read() for _ in range(self.int())]
        else:
            raise ValueError(f"unsupported R object type {sxp}")
        if has_attr:
            attrs = self.read()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and sxp == 19:
                return dict(zip(names, vals))
        return vals


def _paragraphs(lines: list[str | None]) -> str:
    """Gutenberg-style hard-wrapped lines -> one paragraph per line."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(paras) + "\n"


def austen_documents(deb: Path) -> list[Document]:
    """Jane Austen's six novels: one document per novel, one paragraph per line."""
    files = _deb_files(deb, ["/data/Rdata.rdx", "/data/Rdata.rdb"])
    rdx = next(v for k, v in files.items() if k.endswith(".rdx"))
    rdb = next(v for k, v in files.items() if k.endswith(".rdb"))
    index = _RdsReader(zlib.decompress(rdx[4:]) if rdx[:2] != b"\x1f\x8b" else gzip.decompress(rdx)).read()
    docs = []
    for var, (offset, length) in sorted(index["variables"].items()):
        blob = rdb[offset : offset + length]
        vector = _RdsReader(zlib.decompress(blob[4:])).read()  # 4-byte BE length + zlib
        docs.append(Document(f"austen/{AUSTEN_SLUGS.get(var, var)}", _paragraphs(vector)))
    if len(docs) != 6:
        raise UserError(f"{deb}: found {len(docs)} novels in Rdata.rdb, expected 6")
    return docs


# ============================================================================ World English Bible

_BOOK_START = re.compile(r'<div\b[^>]*\bosisID="([^"]+)"[^>]*\bsID="[^"]*"[^>]*\btype="book"[^>]*/>')
_BREAKS = re.compile(r'<(?:div\b[^>]*\beID=[^>]*type="x-p"|l\b[^>]*\beID=|lb\b|chapter\b[^>]*\beID=|title\b[^>]*>|/title)[^>]*>')


def _osis_to_text(osis: str) -> str:
    # Footnotes sit between words without spaces around them: replace by a space, and take back
    # the spaces this leaves before punctuation below.
    osis = re.sub(r"<note\b.*?</note>", " ", osis, flags=re.S)
    osis = re.sub(r"<title\b[^>]*>.*?</title>", "\n", osis, flags=re.S)  # headings are not prose
    osis = _BREAKS.sub("\n", osis)
    osis = html.unescape(re.sub(r"<[^>]+>", "", osis))
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in osis.split("\n"))
    lines = (re.sub(r" +([,.;:!?)\]\u201d\u2019])", r"\1", line) for line in lines)
    return "\n".join(line for line in lines if line) + "\n"


def web_documents(deb: Path) -> list[Document]:
    """World English Bible (with deuterocanon): one document per book, one paragraph per line."""
    root = "/modules/texts/ztext/engWEB2015eb/"
    files = _deb_files(deb, [root + f"{t}.{e}" for t in ("ot", "nt") for e in ("bzs", "bzz", "bzv")])
    get = lambda name: next(v for k, v in files.items() if k.endswith(root + name))  # noqa: E731
    osis_parts = []
    for testament in ("ot", "nt"):
        bzs, bzz, bzv = get(f"{testament}.bzs"), get(f"{testament}.bzz"), get(f"{testament}.bzv")
        blocks = []
        for offset, csize, _usize in struct.iter_unpack("<III", bzs):
            blocks.append(zlib.decompress(bzz[offset : offset + csize]) if csize else b"")
        # Verse records point into the blocks; joining verses with a space keeps words apart.
        for block, start, length in struct.iter_unpack("<IIH", bzv):
            if length:
                osis_parts.append(blocks[block][start : start + length].decode("utf-8", "replace"))
    osis = " ".join(osis_parts)
    slugs = {o: s for _, o, s in BOOKS} | DEUTERO_SLUGS
    starts = list(_BOOK_START.finditer(osis))
    docs: dict[str, str] = {}
    for i, m in enumerate(starts):  # the preface before Genesis is not a book: dropped
        body = osis[m.end() : starts[i + 1].start() if i + 1 < len(starts) else len(osis)]
        name = f"web/{slugs.get(m.group(1), m.group(1).lower())}"
        docs[name] = docs.get(name, "") + _osis_to_text(body)
    if len(docs) < len(BOOKS):
        raise UserError(f"{deb}: found {len(docs)} books in the SWORD module, expected >= {len(BOOKS)}")
    return [Document(n, t) for n, t in docs.items()]


# ============================================================================ the embedded corpus


def _read_jsonl_docs(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as fh:
        return [Document(**json.loads(line)) for line in fh]


def embedded_documents(cache_dir: str | os.PathLike, progress=None) -> list[Document]:
    """The default corpus (KJV, WEB, Austen), fetched and cleaned once into `cache_dir/corpus/`.

    Raises UserError with the command to run by hand if the packages cannot be fetched.
    """
    from rayq.config import atomic_write_text

    corpus_dir = Path(cache_dir).expanduser() / "corpus"
    cached = corpus_dir / f"embedded-v{EMBEDDED_VERSION}.jsonl"
    if cached.is_file():
        return _read_jsonl_docs(cached)
    say = progress or (lambda msg: None)
    say(f"fetching {', '.join(EMBEDDED_PACKAGES)} with apt-get download into {corpus_dir / 'debs'}")
    debs = fetch_debs(corpus_dir / "debs")
    say("cleaning King James Bible, Jane Austen, World English Bible")
    docs = kjv_documents(debs["bible-kjv-text"]) + austen_documents(debs["r-cran-janeaustenr"])
    docs += web_documents(debs["sword-text-web"])
    atomic_write_text(cached, "".join(json.dumps({"name": d.name, "text": d.text}) + "\n" for d in docs))
    return docs
