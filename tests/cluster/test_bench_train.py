"""`rayq bench train --quick` runs the one loop and the bare baseline and prints their ratios."""

import json

from rayq import config as config_io
from rayq.cli import main


def test_bench_train_quick_prints_json(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    config_io.save(cfg, tmp_path / "c.yaml")
    assert main(["bench", "train", "--quick", "--json", "--config", str(tmp_path / "c.yaml")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("bare_fp32_tokens_per_s", "rayq_fp32_tokens_per_s", "rayq_bf16_tokens_per_s",
                "loop_overhead_vs_bare", "bf16_speedup_vs_fp32", "allocator"):
        assert key in out
    assert out["rayq_fp32_tokens_per_s"] > 0 and out["allocator"] in ("glibc-keep-pages", "jemalloc", "system")
