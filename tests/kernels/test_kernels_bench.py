"""`rayq bench int8 --quick --json` runs both allocator legs and records the machine and the
probe's choice (speed is not asserted: targets live in the recorded bench JSON, not in timed tests)."""

from __future__ import annotations

import json

import pytest

from rayq.kernels import backends, bench


def test_quick_bench_json_records_machine_choice_and_both_allocators(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RAYQ_CACHE_DIR", str(tmp_path))
    backends.forget()
    assert bench.main(["--quick", "--json", "--rounds", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "int8"
    mach = out["env"]["machine"]
    assert mach["model"] and isinstance(mach["kernel_flags"], list) and mach["torch"]
    assert set(out["legs"]) == {"tuned", "system"}
    assert out["legs"]["system"]["allocator"]["allocator"] == "system"
    assert out["legs"]["tuned"]["allocator"]["allocator"] in ("glibc-keep-pages", "jemalloc", "system")
    chosen = {name for name, entry in out["env"]["backends"]["cpu_choices"].items() if entry}
    for leg in out["legs"].values():
        assert len(leg["linear"]) == len(bench.QUICK_SHAPES)
        for row in leg["linear"]:
            assert {"fp32_ms", "bf16_ms", "w8a8_auto_ms", "w8a8_s8s8_eager_ms", "int_mm_s8s8_ms",
                    "speedup_vs_fp32", "speedup_vs_bf16", "auto_form"} <= set(row)
            assert row["w8a8_auto_ms"] > 0 and row["auto_form"] in ("s8s8", "u8s8", "onednn", "f32")
            assert row["shape_class"] in chosen  # the choice the timed module used is in the JSON
    for entry in out["env"]["backends"]["cpu_choices"].values():
        if entry:
            assert backends.CPU_FORMS[entry["backend"]]


def test_bench_bad_flag_exits_2():
    with pytest.raises(SystemExit) as exc:
        bench.main(["--rounds", "0"])
    assert exc.value.code == 2


@pytest.mark.skipif(bench.torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_cuda_without_cuda_is_a_one_line_refusal(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda", "--json"])
    assert exc.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
