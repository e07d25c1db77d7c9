"""The small shared helpers of the core: `did_you_mean` and the stderr progress line."""

from __future__ import annotations

import io

from rayq.errors import did_you_mean
from rayq.progress import human_count, human_duration, progress_line, say


def test_did_you_mean():
    assert did_you_mean("trian", ["train", "search"]) == "; did you mean 'train'?"
    assert did_you_mean("zzz", ["train", "search"]) == ""
    assert did_you_mean("w8a8", ["w8a8-vectorwise"]) == ""  # below the default cutoff
    assert did_you_mean("w8a8", ["w8a8-vectorwise"], cutoff=0.3) == "; did you mean 'w8a8-vectorwise'?"
    assert did_you_mean(3, [1, 3]) == "; did you mean '3'?"  # non-strings (Literal values) compare as text


def test_progress_line():
    assert progress_line(120, 900, loss=4.2134, tokens_per_s=5300, elapsed_s=48) == \
        "step 120/900 · loss 4.213 · 5.3k tok/s · eta 5m12s"
    assert progress_line(0, 10, elapsed_s=0.0) == "step 0/10"  # no pace yet, no ETA
    assert progress_line(5, 10, loss=float("nan")) == "step 5/10 · loss nan"
    assert human_count(2_400_000) == "2.4M" and human_count(12.5) == "12.5"
    assert human_duration(3 * 3600 + 120) == "3h2m" and human_duration(42) == "42s" and human_duration(-1) == "?"
    assert human_duration(900) == "15m"


def test_say_writes_one_flushed_line():
    buf = io.StringIO()
    say("preparing data", prefix="[rayq] ", stream=buf)
    assert buf.getvalue() == "[rayq] preparing data\n"
