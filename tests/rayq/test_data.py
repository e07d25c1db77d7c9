"""rayq.data: prepare (tokenizer, shards, manifest, held-out split, cache) and batch iteration.

A few-KB corpus of generated sentences written into tmp_path keeps these fast; the real embedded
corpus is exercised by the slow test in test_corpus.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rayq import batches as batches_io
from rayq import data as data_io
from rayq.config import resolve
from rayq.errors import UserError

NOUNS = "king river house garden letter sister horse morning city friend window mountain story voice".split()
VERBS = "saw found loved carried wrote heard followed remembered opened painted".split()
ADJS = "old quiet bright little gentle strange golden happy dark".split()


def sentence(rng: random.Random) -> str:
    a, n, v, a2, n2 = rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(ADJS), rng.choice(NOUNS)
    tail = rng.choice(["", f" near the {rng.choice(NOUNS)}", f" in {rng.randint(1800, 1899)}", ", and smiled"])
    return f"The {a} {n} {v} a {a2} {n2}{tail}."


def write_corpus(root: Path, n_docs: int = 8, sentences: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        paras = [" ".join(sentence(rng) for _ in range(5)) for _ in range(sentences // 5)]
        (root / f"doc{i}.txt").write_text("\n".join(paras) + "\n")
    return root


def prepare_cfg(cfg):
    return data_io.prepare(cfg.data, cfg.model.vocab_size)


def make_cfg(corpus: Path, cache: Path, **data):
    values = {
        "data.sources": [str(corpus / "*.txt")],
        "data.heldout_documents": ["doc7"],
        "data.cache_dir": str(cache),
        "data.tokenizer_train_chars": 10_000,
        "data.shard_tokens": 1024,
        "model.vocab_size": 300,
        "model.seq_len": 16,
    }
    values.update({f"data.{k}": v for k, v in data.items()})
    return resolve(preset="tiny", values=values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> data_io.PreparedData:
    return prepare_cfg(make_cfg(corpus, tmp_path_factory.mktemp("cache")))


# ----------------------------------------------------------------------------- prepare


def test_prepared_layout_manifest_and_schema(prepared, corpus):
    m = prepared.manifest
    assert m["schema_version"] == data_io.SCHEMA_VERSION
    assert prepared.root.name == prepared.key and prepared.root.parent.name == "prepared"
    assert m["inputs"]["documents"] == 8
    assert m["splits"]["train"]["documents"] == 7 and m["splits"]["heldout"]["documents"] == 1
    assert m["heldout_documents"] == ["doc7"]
    assert len(m["splits"]["train"]["shards"]) > 1  # shard_tokens=1024 splits the train stream
    table = pq.read_table(prepared.train_files()[0])
    assert table.schema.names == ["doc", "chunk", "tokens"]
    assert str(table.schema.field("tokens").type) == "list<element: int32>"
    train = prepared.tokens("train")
    assert train.dtype == np.int32 and len(train) == prepared.num_tokens("train")
    assert sum(s["tokens"] for s in m["splits"]["train"]["shards"]) == len(train)
    assert train.max() < prepared.vocab_size <= 300
    # every document ends with EOS, so the stream holds one EOS per document
    assert (train == prepared.eos_id).sum() == 7
    assert all(Path(f).is_file() for f in prepared.train_files())


def test_tokenizer_round_trip_and_heldout_texts(prepared, corpus):
    text = "The quiet king wrote a letter.\nUnseen: Zürich, 42 ✓"
    assert prepared.decode(prepared.encode(text)) == text  # byte fallback: any text encodes
    assert prepared.tokenizer().vocab_size() == prepared.vocab_size
    texts = prepared.heldout_texts()
    assert texts == {"doc7": (corpus / "doc7.txt").read_text()}
    held = prepared.tokens("heldout")
    assert prepared.decode(held[:-1]) == texts["doc7"]  # everything but the final EOS


def test_same_inputs_reuse_the_cache_without_recomputing(prepared, corpus, monkeypatch):
    manifest = prepared.root / "manifest.json"
    before = manifest.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(data_io, "train_tokenizer", boom)
    again = prepare_cfg(make_cfg(corpus, prepared.root.parent.parent))
    assert again.root == prepared.root and manifest.stat().st_mtime_ns == before


def test_inputs_or_relevant_config_change_the_key(prepared, corpus, tmp_path):
    def key(cfg, docs):
        return data_io.prepare_key(cfg.data, cfg.model.vocab_size, docs)

    cache = prepared.root.parent.parent
    assert key(make_cfg(corpus, cache, shard_tokens=2048), []) != key(make_cfg(corpus, cache), [])
    # seq_len and cache_dir do not change what is prepared; the vocabulary size does
    cfg = make_cfg(corpus, tmp_path)
    assert key(cfg, []) == key(make_cfg(corpus, cache), [])
    assert data_io.prepare_key(cfg.data, 301, []) != key(cfg, [])
    from rayq.corpus import Document
    assert key(cfg, [Document("a", "x")]) != key(cfg, [Document("a", "y")])


def test_prepare_is_deterministic(corpus, tmp_path):
    a = prepare_cfg(make_cfg(corpus, tmp_path / "a"))
    b = prepare_cfg(make_cfg(corpus, tmp_path / "b"))
    assert a.key == b.key
    assert (a.root / "tokenizer.model").read_bytes() == (b.root / "tokenizer.model").read_bytes()
    assert np.array_equal(a.tokens("train"), b.tokens("train"))
    assert np.array_equal(a.tokens("heldout"), b.tokens("heldout"))


def test_killed_build_leaves_no_cache_and_next_run_builds(corpus, tmp_path, monkeypatch):
    cfg = make_cfg(corpus, tmp_path)
    real = data_io._write_split
    calls = []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the train shards are written, before the held-out ones
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(data_io, "_write_split", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_cfg(cfg)
    assert list((tmp_path / "prepared").iterdir()) == []  # neither a half-written key nor a temp dir
    monkeypatch.setattr(data_io, "_write_split", real)
    prepared = prepare_cfg(cfg)
    assert (prepared.root / "manifest.json").is_file()


def test_incomplete_cache_is_rebuilt(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    first = prepare_cfg(cfg)
    shard = Path(first.train_files()[-1])
    expected = first.tokens("train")
    shard.unlink()
    again = prepare_cfg(cfg)
    assert again.root == first.root and shard.is_file()
    assert np.array_equal(again.tokens("train"), expected)


def test_heldout_fraction_holds_out_document_tails(corpus, tmp_path):
    prepared = prepare_cfg(make_cfg(corpus, tmp_path, heldout_fraction=0.25))
    texts = prepared.heldout_texts()
    assert "doc7" in texts and "doc0#tail" in texts and len(texts) == 8
    full = (corpus / "doc0.txt").read_text()
    assert full.endswith(texts["doc0#tail"]) and 0.15 < len(texts["doc0#tail"]) / len(full) < 0.4
    rows = [r for f in prepared.train_files() for r in pq.read_table(f).to_pylist()]
    head = [r["tokens"] for r in rows if r["doc"] == "doc0"]
    assert [r["chunk"] for r in rows if r["doc"] == "doc0"] == list(range(len(head)))
    head_text = prepared.decode([i for chunk in head for i in chunk if i != prepared.eos_id])
    assert head_text + texts["doc0#tail"] == full


def test_max_train_tokens_caps_the_train_split(corpus, tmp_path):
    prepared = prepare_cfg(make_cfg(corpus, tmp_path, max_train_tokens=1500))
    assert prepared.num_tokens("train") == 1500 == len(prepared.tokens("train"))


def test_unknown_heldout_document_names_the_closest(corpus, tmp_path):
    with pytest.raises(UserError, match=r"'doc_3'.*did you mean 'doc3'"):
        prepare_cfg(make_cfg(corpus, tmp_path, heldout_documents=["doc_3"]))
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_missing_corpus_file_is_a_user_error(tmp_path):
    cfg = make_cfg(tmp_path / "nowhere", tmp_path)
    with pytest.raises(UserError, match="nowhere"):
        prepare_cfg(cfg)


# ----------------------------------------------------------------------------- batches


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_batches_shape_shift_and_seeded_order(prepared):
    stream = batches_io.train_batches(prepared, batch_size=4, seq_len=16, seed=1)
    x, y = next(stream)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.from_numpy(prepared.tokens("train").astype(np.int64))
    for row_x, row_y in zip(x, y):  # every row is a window starting at a multiple of T
        starts = [s for s in range(0, len(tokens) - 16, 16) if torch.equal(tokens[s : s + 16], row_x)]
        assert starts and torch.equal(tokens[starts[0] + 1 : starts[0] + 17], row_y)
    same = batches_io.train_batches(prepared, batch_size=4, seq_len=16, seed=1)
    other = batches_io.train_batches(prepared, batch_size=4, seq_len=16, seed=2)
    a, b, c = _take(stream, 3), _take(same, 4)[1:], _take(other, 4)[1:]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_each_epoch_visits_every_window_once(prepared):
    stream = batches_io.TokenStream(np.arange(8 * 10 + 1, dtype=np.int32), seq_len=8, batch_size=5, seed=3)
    firsts = [int(v) for _ in range(4) for v in next(stream)[0][:, 0]]
    assert sorted(firsts[:10]) == list(range(0, 80, 8)) == sorted(firsts[10:])
    assert firsts[:10] != firsts[10:]  # a new order each epoch


def test_resume_continues_with_the_same_batches(prepared):
    straight = _take(batches_io.train_batches(prepared, 50, 16, seed=5), 40)
    assert batches_io.train_batches(prepared, 50, 16).num_windows < 40 * 50  # crosses epoch boundaries
    first = batches_io.train_batches(prepared, 50, 16, seed=5)
    _take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON-able ints
    resumed = batches_io.train_batches(prepared, 50, 16, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (xr, yr) in zip(straight[17:], _take(resumed, 23)):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_state_from_other_data_is_rejected(prepared):
    stream = batches_io.train_batches(prepared, 3, 16)
    with pytest.raises(UserError, match="seq_len"):
        stream.load_state_dict({**stream.state_dict(), "seq_len": 32})


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_global_batch(prepared, world_size):
    B, steps = 2, 30
    whole = _take(batches_io.train_batches(prepared, B * world_size, 16, seed=7), steps)
    ranks = [_take(batches_io.train_batches(prepared, B, 16, seed=7, rank=r, world_size=world_size), steps)
             for r in range(world_size)]
    for k in range(steps):
        assert torch.equal(torch.cat([ranks[r][k][0] for r in range(world_size)]), whole[k][0])
        assert torch.equal(torch.cat([ranks[r][k][1] for r in range(world_size)]), whole[k][1])


def test_ranks_resume_from_a_shared_position(prepared):
    a = batches_io.train_batches(prepared, 2, 16, seed=0, rank=1, world_size=2)
    _take(a, 5)
    b = batches_io.train_batches(prepared, 2, 16, seed=0, rank=1, world_size=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(a)[0], next(b)[0])


def test_heldout_batches_are_fixed_and_cover_the_split(prepared):
    batches = batches_io.heldout_batches(prepared, 3, 2, 16)
    assert len(batches) == 3 and all(x.shape == (2, 16) for x, _ in batches)
    again = batches_io.heldout_batches(prepared, 3, 2, 16)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    held = prepared.tokens("heldout")
    assert int(batches[-1][0][-1, 0]) in held[len(held) // 2 :]  # spread over the split, not just its start


def test_empty_heldout_split_is_a_clear_error(corpus, tmp_path):
    prepared = prepare_cfg(make_cfg(corpus, tmp_path, heldout_documents=[]))
    assert prepared.num_tokens("heldout") == 0
    with pytest.raises(UserError, match="held-out split"):
        batches_io.heldout_batches(prepared, 1, 2, 16)


def test_too_short_train_split_is_a_clear_error():
    with pytest.raises(UserError, match="seq_len"):
        batches_io.TokenStream(np.arange(10, dtype=np.int32), seq_len=16, batch_size=1)


# ----------------------------------------------------------------------------- BOS


def test_bos_starts_every_window_and_is_in_the_cache_key(corpus, tmp_path, prepared):
    with_bos = prepare_cfg(make_cfg(corpus, tmp_path, bos=True))
    assert with_bos.key != prepared.key and prepared.window_bos is None
    bos = with_bos.window_bos
    assert bos == with_bos.tokenizer().bos_id() == data_io.SPM_BOS_ID
    assert np.array_equal(with_bos.tokens("train"), prepared.tokens("train"))  # BOS is cut in, not stored
    stream = batches_io.train_batches(with_bos, batch_size=4, seq_len=16, seed=1)
    assert stream.num_windows == len(with_bos.tokens("train")) // 16
    x, y = next(stream)
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 0] == bos).all() and torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.from_numpy(with_bos.tokens("train").astype(np.int64))
    for row in y:  # y is a whole window of the stream, starting at a multiple of T
        assert any(torch.equal(tokens[s : s + 16], row) for s in range(0, len(tokens) - 15, 16))
    assert bos not in with_bos.tokens("train")  # the corpus itself never holds BOS: only window starts do
    for hx, hy in batches_io.heldout_batches(with_bos, 2, 3, 16):
        assert (hx[:, 0] == bos).all() and torch.equal(hx[:, 1:], hy[:, :-1])


def test_bos_windows_cover_every_token_once_per_epoch():
    stream = batches_io.TokenStream(np.arange(3, 8 * 10 + 3, dtype=np.int32), seq_len=8, batch_size=5, seed=3, bos_id=1)
    assert stream.num_windows == 10
    ys = torch.cat([next(stream)[1] for _ in range(2)])
    assert sorted(ys.flatten().tolist()) == list(range(3, 83))
