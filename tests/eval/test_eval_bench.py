import json


def test_bench_eval_json_schema(capsys, monkeypatch, tmp_path):
    from rayq.eval.bench import main

    monkeypatch.setenv("RAYQ_CACHE_DIR", str(tmp_path))
    assert main(["--preset", "tiny", "--sequences", "4", "--repeats", "1", "--backends", "auto", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench"] == "eval" and doc["preset"] == "tiny" and doc["tokens_per_repeat"] == 4 * 64
    assert set(doc["results"]) == {"fp32", "bf16", "w8a8-vectorwise", "w8a8-vectorwise@bf16"}
    assert doc["results"]["fp32"]["tokens_per_s_median"] > 0 and doc["ratio"]["w8a8-vectorwise"] > 0
    assert doc["ratio_to_bf16"]["w8a8-vectorwise"] > 0 and isinstance(doc["target_ge_bf16"]["w8a8-vectorwise"], bool)
    assert doc["allocator"]["allocator"] in ("glibc-keep-pages", "jemalloc", "system")
    assert doc["cpu"]["machine"]["model"] and "cpu_choices" in doc["cpu"]
    # the quantized model ran at least one call, so its shape class was probed and is recorded
    assert any(entry and entry["backend"] for entry in doc["cpu"]["cpu_choices"].values())
