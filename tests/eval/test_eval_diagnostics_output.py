"""`rayq eval --diagnostics` output (JSON `diagnostics.sites.<linear>` and the table) and
`rayq bench eval --diagnostics` (the cost measurement)."""

import json

import pytest

from rayq import checkpoint
from rayq.eval.commands import eval_
from rayq.schema import Config, EvalConfig, RecipeConfig


@pytest.fixture(scope="module")
def ckpt(trained_gpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = Config(model=trained_gpt.cfg, recipe=RecipeConfig(precision="fp32"),
                 eval=EvalConfig(tasks=["heldout-cloze"], task_size=8, kl_tokens=1024, batch_size=8,
                                 bootstrap_samples=20, schemes=["w8a8-vectorwise"]))
    checkpoint.write(root / "checkpoints" / "step_300", model_state=trained_gpt.model.state_dict(), optim_state=None,
                     trainer_state={"step": 300}, cfg=cfg)
    (root / "tok.model").write_bytes(trained_gpt.proto)
    (root / "heldout.txt").write_text(trained_gpt.heldout["toy/heldout"])
    return root


def _args(root):
    return [str(root), "--tokenizer", str(root / "tok.model"), "--heldout", str(root / "heldout.txt"), "--diagnostics"]


def test_eval_diagnostics_json_has_sites_blocks_and_probes(ckpt, trained_gpt, capsys):
    assert eval_([*_args(ckpt), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    diag = doc["diagnostics"]
    L = trained_gpt.cfg.n_layer
    assert set(diag["sites"]) == {f"blocks.{i}.{s}" for i in range(L) for s in ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out")}
    qkv = diag["sites"]["blocks.0.attn.qkv"]
    assert {"kurtosis", "kurtosis_nopos0", "max_median", "max_median_nopos0", "crest", "crest_nopos0"} <= set(qkv)
    assert 0 <= diag["blocks"]["blocks.1"]["sink_rate"] <= 1 and diag["blocks"]["blocks.1"]["bos_norm_ratio"] > 0
    assert diag["layernorms"]["ln_f"]["gain_max_median"] >= 1
    assert set(diag["probes"]) == {"w8a8-vectorwise", "a8-tensor-minmax", "a8-tensor-p99.99", "a6-token", "a8-channel-oracle"}
    kl = diag["probes"]["a8-tensor-minmax"]["kl"]
    assert kl["low"] <= kl["estimate"] <= kl["high"]
    # the same numbers in the flat metric stream the train loop reports
    m = doc["metrics"]
    assert m["diag/blocks.0.attn.qkv/kurtosis"] == qkv["kurtosis"]
    assert m["diag/probe/a8-tensor-minmax/kl"] == kl["estimate"]


def test_eval_diagnostics_table(ckpt, capsys):
    assert eval_(_args(ckpt)) == 0
    out = capsys.readouterr().out
    assert "outlier diagnostics" in out and "blocks.0.attn.qkv" in out and "sink rate" in out
    assert "quantizer probes" in out and "a8-channel-oracle" in out


def test_bench_eval_diagnostics_json(capsys):
    from rayq.eval.bench import main

    assert main(["--diagnostics", "--preset", "tiny", "--batch-size", "2", "--repeats", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench"] == "eval-diagnostics" and doc["tokens"] == 2 * 2 * doc["model"]["seq_len"]
    assert set(doc["results"]) == {"forward", "outliers", "analyze_no_probes", "analyze", "eval_kl_step"}
    assert doc["results"]["forward"]["ratio_to_forward"] == 1.0
    assert all(r["seconds_median"] > 0 for r in doc["results"].values())
