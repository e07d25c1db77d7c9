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


def test_bench_eval_graph_legs_add_keys_and_keep_the_old_ones(capsys, monkeypatch, tmp_path):
    """`--backends graph`: the quantized model compiled whole, fp32 and under bf16 autocast, and
    the FP model compiled whole under bf16 autocast, with ratios to both bf16 legs."""
    import torch

    from rayq.eval.bench import main

    monkeypatch.setenv("RAYQ_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()  # process-wide caches count towards Dynamo's recompile limit
    try:
        assert main(["--preset", "tiny", "--sequences", "4", "--repeats", "1", "--backends", "graph", "--json"]) == 0
    finally:
        torch._dynamo.reset()
    doc = json.loads(capsys.readouterr().out)
    legs = {"w8a8-vectorwise+graph", "w8a8-vectorwise+graph@bf16"}
    assert set(doc["results"]) == {"fp32", "bf16", "bf16+graph"} | legs
    assert set(doc["ratio_to_bf16"]) == {"bf16+graph"} | legs and set(doc["target_ge_bf16"]) == set(doc["ratio_to_bf16"])
    assert set(doc["ratio_to_bf16_graph"]) == legs and all(v > 0 for v in doc["ratio_to_bf16_graph"].values())
    assert all(isinstance(v, bool) for v in doc["target_ge_bf16_graph"].values())
    forms = doc["graph_forms"]["w8a8-vectorwise+graph"]
    assert forms["failure"] is None
    # every quantized layer was prepared for fp32 and for bf16 output (the @bf16 leg)
    assert {dtype: sum(f.values()) for dtype, f in forms["forms"].items()} == {"float32": 8, "bfloat16": 8}
