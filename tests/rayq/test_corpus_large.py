"""`data.corpus: large`: the readers of dictd, WordNet and SWORD commentary packages, on .deb files
built here in the packages' real formats, and (slow) on the real Debian packages."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from rayq.corpus import large
from rayq.errors import UserError
from rayq.schema import DataConfig


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb (ar archive) whose data.tar.gz holds `files` under ./usr/share/..."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo("./" + name.lstrip("/"))
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    members = [("debian-binary", b"2.0\n"), ("data.tar.gz", tar_bytes.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = large._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def _dictd(entries: list[tuple[str, str]]) -> tuple[bytes, bytes]:
    body, index = b"", []
    for head, text in [("00-database-info", "This file was converted by dictfmt\n"), *entries]:
        raw = text.encode()
        index.append(f"{head}\t{_b64(len(body))}\t{_b64(len(raw))}")
        body += raw
    return gzip.compress(body), ("\n".join(sorted(index)) + "\n").encode()


def test_dictd_entries_become_paragraph_lines_per_initial_letter(tmp_path):
    dz, index = _dictd([
        ("Abuse", "Abuse \\A*buse\"\\, v. t. To put to a wrong use;\n   to misapply.\n   [1913 Webster]\n\n"
                  "   2. To use ill; to {maltreat}.\n   [1913 Webster]\n"),
        ("zebra", "zebra\n  n.  A striped\n  horse.\n"),
        ("3D", "3D\n\n   Three dimensions.\n"),
    ])
    deb = _deb(tmp_path / "dict-test_1_all.deb", {"usr/share/dictd/test.dict.dz": dz,
                                                  "usr/share/dictd/test.index": index})
    docs = {d.name: d.text for d in large.dictd_documents(deb, "test")}
    assert list(docs) == ["test/a", "test/other", "test/z"]
    assert docs["test/a"] == ("Abuse \\A*buse\"\\, v. t. To put to a wrong use; to misapply.\n"
                              "2. To use ill; to maltreat.\n")
    assert docs["test/z"] == "zebra n. A striped horse.\n"
    assert "dictfmt" not in "".join(docs.values())  # the 00-database entries are metadata


def test_wordnet_glosses_skip_the_licence_header(tmp_path):
    data = (b"  1 This software and database is being provided to you, the LICENSEE, by  \n"
            b"00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist  \n"
            b"00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept; \"an example\"  \n")
    files = {f"usr/share/wordnet/data.{pos}": (data if pos == "noun" else b"") for pos in ("noun", "verb", "adj", "adv")}
    docs = {d.name: d.text for d in large.wordnet_documents(_deb(tmp_path / "wordnet-base_1_all.deb", files))}
    assert docs["wordnet/noun"] == ("entity: that which is perceived to exist\n"
                                    "abstraction, abstract entity: a general concept; \"an example\"\n")
    assert docs["wordnet/verb"] == "\n"


@pytest.mark.parametrize("record", ["<IIH", "<III"])
def test_sword_commentary_reads_zcom_and_zcom4_layouts(tmp_path, record):
    verses = ['<div type="x-p">In the <hi>beginning</hi>.</div>', "", "A note &amp; more."]
    block = "".join(verses).encode()
    bzz = zlib.compress(block)
    bzs = struct.pack("<III", 0, len(bzz), len(block))
    starts = [0, len(verses[0]), len(verses[0])]
    bzv = b"".join(struct.pack(record, 0, s, len(v.encode())) for s, v in zip(starts, verses))
    ext = "b" if record == "<IIH" else "c"
    root = "usr/share/sword/modules/comments/zcom/test/"
    deb = _deb(tmp_path / "sword-comm-test_1_all.deb",
               {root + f"ot.{ext}zs": bzs, root + f"ot.{ext}zz": bzz, root + f"ot.{ext}zv": bzv})
    docs = large.sword_commentary_documents(deb, "test")
    assert [(d.name, d.text) for d in docs] == [("test/ot", "In the beginning.\nA note & more.\n")]


def test_sword_commentary_without_text_is_a_user_error(tmp_path):
    deb = _deb(tmp_path / "sword-comm-none_1_all.deb", {"usr/share/doc/none/copyright": b"x"})
    with pytest.raises(UserError, match="no commentary text"):
        large.sword_commentary_documents(deb, "none")


def test_corpus_large_and_sources_are_exclusive():
    with pytest.raises(ValueError, match="corpus"):
        DataConfig(sources=["a/*.txt"], corpus="large")
    assert DataConfig(corpus="large").corpus == "large"


@pytest.mark.slow
def test_real_large_corpus(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available")
    extra = large.large_extra_documents(tmp_path / "debs")
    names = [d.name for d in extra]
    assert len(names) == len(set(names))
    words = {}
    for d in extra:
        words[d.name.split("/")[0]] = words.get(d.name.split("/")[0], 0) + len(d.text.split())
    assert set(words) == {"gcide", "foldoc", "jargon", "devil", "wordnet", "debian-reference", "mhcc", "tdavid",
                          "scofield"}
    assert words["gcide"] > 4_000_000 and words["wordnet"] > 1_000_000 and words["tdavid"] > 1_500_000
    assert sum(words.values()) > 9_000_000
    text = "".join(d.text for d in extra)
    assert "[1913 Webster]" not in text and "<div" not in text and "00-database" not in text
