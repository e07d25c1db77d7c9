"""rayq.corpus: user sources (txt / jsonl / Parquet, local and pyarrow URIs), their errors, and
the embedded Debian corpus (the real fetch is the one slow test)."""

from __future__ import annotations

import shutil
import subprocess
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayq import corpus
from rayq.corpus import Document, embedded, read_sources
from rayq.errors import UserError


def test_txt_files_are_one_document_each_named_by_relative_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first\nbook\n")
    (tmp_path / "b.txt").write_text("second")
    docs = read_sources([str(tmp_path / "**" / "*.txt")])
    assert docs == [Document("a/one", "first\nbook\n"), Document("b", "second")]
    assert read_sources([str(tmp_path / "b.txt")]) == [Document("b", "second")]
    assert [d.name for d in read_sources([str(tmp_path)])] == ["a/one", "b"]  # a directory: all known files


def test_jsonl_lines_and_parquet_rows_are_documents(tmp_path):
    (tmp_path / "notes.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta", "name": "b"}\n')
    pq.write_table(pa.table({"text": ["gamma", None, "delta"], "id": [10, 11, 12]}), tmp_path / "rows.parquet")
    docs = read_sources([str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")])
    assert docs == [Document("notes/1", "alpha"), Document("notes/b", "beta"),
                    Document("rows/10", "gamma"), Document("rows/12", "delta")]


def test_pyarrow_filesystem_uris(tmp_path):
    (tmp_path / "x.txt").write_text("via a filesystem uri")
    (tmp_path / "y.jsonl").write_text('{"text": "row"}\n')
    uri = f"file://{tmp_path}"
    assert read_sources([f"{uri}/*.txt"]) == [Document("x", "via a filesystem uri")]
    assert [d.name for d in read_sources([uri])] == ["x", "y/1"]
    with pytest.raises(UserError, match="no file matches"):
        read_sources([f"{uri}/missing.txt"])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(UserError, match=r"no file matches .*absent\.txt"):
        read_sources([str(tmp_path / "absent.txt")])


def test_unreadable_parquet_names_the_file(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(UserError, match=r"broken\.parquet: unreadable Parquet"):
        read_sources([str(bad)])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(UserError, match=r"nocol\.parquet: .*no column \"text\""):
        read_sources([str(tmp_path / "nocol.parquet")])


def test_malformed_jsonl_line_reports_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"data\.jsonl:3: malformed JSON"):
        read_sources([str(f)])
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"data\.jsonl:2: .*\"text\""):
        read_sources([str(f)])


def test_non_utf8_and_unknown_types_are_user_errors(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt: not UTF-8"):
        read_sources([str(tmp_path / "latin.txt")])
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match=r"image\.png: unknown file type"):
        read_sources([str(tmp_path / "image.png")])


def test_duplicate_names_are_rejected(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "name": "x"}\n{"text": "b", "name": "x"}\n')
    with pytest.raises(UserError, match="duplicate document name 'd/x'"):
        read_sources([str(tmp_path / "d.jsonl")])


def test_no_apt_get_gives_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError) as err:
        corpus.embedded_documents(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "apt-get download bible-kjv-text r-cran-janeaustenr sword-text-web" in msg
    assert str(tmp_path / "corpus" / "debs") in msg


def test_failed_download_gives_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 100, "", "E: Unable to locate package sword-text-web\n"))
    with pytest.raises(UserError, match=r"apt-get download failed \(E: Unable to locate.*run by hand: cd "):
        corpus.embedded_documents(tmp_path)


def test_rds_reader_reads_a_named_list_of_character_vectors():
    import struct

    def i(v):
        return struct.pack(">i", v)

    def chars(s):
        return i(0x40009) + i(len(s)) + s.encode()

    names = i(0x402) + i(1) + chars("names") + i(16) + i(2) + chars("a") + chars("b") + i(254)
    body = i(0x213) + i(2) + i(16) + i(2) + chars("x") + i(9) + i(-1) + i(13) + i(1) + i(7) + names
    blob = b"X\n" + i(3) + i(0x40201) + i(0x30500) + i(5) + b"UTF-8" + body
    assert embedded._RdsReader(zlib.decompress(zlib.compress(blob))).read() == {"a": ["x", None], "b": [7]}


def test_lzw_decoder_on_a_known_stream():
    # 9-bit LZW codes of this text, as `gzip -dc` (an independent .Z decoder) reads them after a
    # 1f 9d 90 header; the width changes of long streams are covered by the slow test on the KJV.
    import base64

    payload = base64.b64decode("VJ4IKfJEipMnVAIOLKiQoEGEIxoWPJhQoEOJD6kA")
    assert embedded._lzw_decompress(payload) == b"TOBEORNOTTOBEORTOBEORNOT#TOBEORNOTTOBEORTOBEORNOT"


@pytest.mark.slow
def test_real_embedded_corpus(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available")
    docs = corpus.embedded_documents(tmp_path)
    names = [d.name for d in docs]
    assert len(names) == len(set(names))
    by = {d.name: d.text for d in docs}
    kjv = [n for n in names if n.startswith("kjv/")]
    austen = [n for n in names if n.startswith("austen/")]
    web = [n for n in names if n.startswith("web/")]
    assert len(kjv) == 66 and kjv[0] == "kjv/genesis" and kjv[-1] == "kjv/revelation"
    assert austen == ["austen/emma", "austen/mansfield-park", "austen/northanger-abbey", "austen/persuasion",
                      "austen/pride-and-prejudice", "austen/sense-and-sensibility"]
    assert len(web) >= 66 and "web/genesis" in web and "web/revelation" in web
    for group in (kjv, austen, web):
        assert 3_500_000 < sum(len(by[n]) for n in group) < 6_000_000
    assert by["kjv/genesis"].startswith("In the beginning God created the heaven and the earth.\n")
    assert by["web/genesis"].startswith("In the beginning, God created the heavens and the earth.")
    assert "Emma Woodhouse, handsome, clever, and rich" in by["austen/emma"]
    assert "<" not in "".join(by[n] for n in web)  # markup stripped, notes dropped
    assert corpus.embedded_documents(tmp_path) == docs  # cached copy


def test_corpus_package_keeps_its_public_names():
    from rayq.corpus import sources

    for name in corpus.__all__:
        assert hasattr(corpus, name), name
    assert corpus.embedded_documents is embedded.embedded_documents and corpus.read_sources is sources.read_sources
