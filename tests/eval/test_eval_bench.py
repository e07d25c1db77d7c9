import json


def test_bench_eval_json_schema(capsys):
    from rayq.eval.bench import main

    assert main(["--preset", "tiny", "--sequences", "4", "--repeats", "1", "--backends", "auto", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench"] == "eval" and doc["preset"] == "tiny" and doc["tokens_per_repeat"] == 4 * 64
    assert set(doc["results"]) == {"fp32", "w8a8-vectorwise"}
    assert doc["results"]["fp32"]["tokens_per_s_median"] > 0 and doc["ratio"]["w8a8-vectorwise"] > 0
    assert doc["allocator"]["allocator"] in ("glibc-keep-pages", "jemalloc", "system")
