"""`rayq bench int8 --quick --json` runs and reports the documented keys (speed is not asserted:
targets live in the recorded bench JSON, not in timed tests)."""

from __future__ import annotations

import json

import pytest

from rayq.kernels import bench


def test_quick_bench_json_keys(capsys):
    assert bench.main(["--quick", "--json", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "int8"
    assert {"torch", "threads", "cpu", "allocator", "cpu_kernel", "quick", "repeats"} <= set(out["env"])
    assert out["env"]["allocator"]["allocator"] in ("glibc-keep-pages", "jemalloc", "system")
    assert len(out["linear"]) == len(bench.QUICK_SHAPES)
    for row in out["linear"]:
        assert {"M", "K", "N", "fp32_ms", "bf16_ms", "w8a8_ms", "w8a8_eager_ms", "int_mm_s8_ms",
                "speedup_vs_fp32", "speedup_vs_bf16", "auto_backend"} <= set(row)
        assert row["w8a8_ms"] > 0 and row["speedup_vs_fp32"] > 0
    (model,) = out["model"]
    assert {"name", "fp32_ms", "bf16_autocast_ms", "w8a8_ms", "speedup_vs_fp32", "speedup_vs_bf16"} <= set(model)
    assert set(out["targets"]) >= {"linear_M>=256_K=N=4096_ge_4x_fp32", "model_ge_2.5x_fp32"}
    assert out["peers"] is None  # quick mode never runs the optional peers


def test_bench_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--repeats", "0"])
    assert exc.value.code == 2
