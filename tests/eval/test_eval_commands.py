"""`rayq eval` / `rayq analyze` on a checkpoint written in the test (command functions called directly,
and once through rayq.cli.main to check the exit code of bad input)."""

import json

import pytest
from eval_helpers import FIXTURES

from rayq import checkpoint
from rayq.errors import UserError
from rayq.eval.commands import analyze, eval_
from rayq.schema import Config, EvalConfig, RecipeConfig

SCHEMES = ["w8a8-vectorwise"]


@pytest.fixture(scope="module")
def ckpt(trained_gpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = Config(model=trained_gpt.cfg, recipe=RecipeConfig(precision="fp32"),
                 eval=EvalConfig(task_size=16, kl_tokens=512, bootstrap_samples=50, schemes=SCHEMES))
    checkpoint.write(root / "checkpoints" / "step_300", model_state=trained_gpt.model.state_dict(), optim_state=None,
                     trainer_state={"step": 300}, cfg=cfg)
    (root / "tok.model").write_bytes(trained_gpt.proto)
    (root / "heldout.txt").write_text(trained_gpt.heldout["toy/heldout"])
    return root


def _data_args(root):
    return ["--tokenizer", str(root / "tok.model"), "--heldout", str(root / "heldout.txt")]


def test_eval_json_on_a_run_directory(ckpt, capsys):
    assert eval_([str(ckpt), "--json", *_data_args(ckpt)]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["step"] == 300 and doc["checkpoint"].endswith("step_300") and doc["precision"] == "fp32"
    m = doc["metrics"]
    assert {"fp/acc", "fp/heldout-lambada/acc", "fp/heldout-cloze/acc"} <= set(m)
    for s in SCHEMES:
        assert {f"ptq/{s}/degradation_pct", f"ptq/{s}/degradation_pct_ci_low", f"ptq/{s}/kl", f"ptq/{s}/kl_se"} <= set(m)
    assert "eval: heldout-cloze" in err  # progress goes to stderr, not stdout


def test_eval_table_with_a_file_task(ckpt, capsys):
    argv = [str(ckpt / "checkpoints" / "step_300"), "--tasks", "piqa,heldout-cloze", "--schemes", ",".join(SCHEMES),
            "--task-path", f"piqa={FIXTURES / 'piqa' / 'valid.jsonl'}", "--bootstrap", "20", *_data_args(ckpt)]
    assert eval_(argv) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "heldout-cloze" in out and "mean acc" in out
    if SCHEMES:
        assert "degradation % [95% CI]" in out and "KL(FP||Q)" in out and "w8a8-vectorwise" in out


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "hellaswg"], "did you mean 'hellaswag'"),
    (["--tasks", "piqa"], r"set eval.task_paths.piqa=PATH"),
    (["--tasks", "winogrande", "--task-path", "winogrande=/nonexistent/dev.jsonl"], "file not found: /nonexistent"),
    (["--task-path", "piqa"], "expected NAME=PATH"),
    (["--set", "eval.tsks=[x]"], "did you mean 'eval.tasks'"),
    (["--tokenizer", "/nonexistent/tok.model"], "--tokenizer /nonexistent/tok.model: file not found"),
])
def test_eval_bad_input_is_a_user_error(ckpt, argv, message):
    with pytest.raises(UserError, match=message):
        eval_([str(ckpt), *_data_args(ckpt), *argv] if "--tokenizer" not in argv else [str(ckpt), *argv])


def test_eval_malformed_task_file_names_the_line(ckpt, tmp_path):
    bad = tmp_path / "lambada.jsonl"
    bad.write_text('{"text": "a b c"}\n{"text": "a b\n')
    with pytest.raises(UserError, match=r"lambada.jsonl:2: malformed JSON line"):
        eval_([str(ckpt), "--tasks", "lambada", "--task-path", f"lambada={bad}", *_data_args(ckpt)])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint found"):
        eval_([str(tmp_path)])


def test_bad_input_exits_2_through_the_cli(ckpt, monkeypatch, capsys):
    from rayq import cli

    monkeypatch.setitem(cli.COMMANDS, "eval", ("rayq.eval.commands:eval_", "score a checkpoint"))
    code = cli.main(["eval", str(ckpt), "--tasks", "hellaswg", *_data_args(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("rayq eval: unknown task 'hellaswg'; did you mean 'hellaswag'?")
    assert not any("Traceback" in line for line in err)


def test_analyze_writes_json_and_plots(ckpt, tmp_path, capsys):
    out = tmp_path / "diag"
    assert analyze([str(ckpt), "--out", str(out), "--batches", "2", "--batch-size", "4", "--json", *_data_args(ckpt)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(p.rsplit("/", 1)[1] for p in doc["files"]) == [
        "activations.png", "diagnostics.json", "ln_gain.png", "spectral_norm.png", "weights_outliers.png"]
    full = json.loads((out / "diagnostics.json").read_text())
    assert full["tokens"] == 2 * 4 * 64 and len(full["qkv_input_rmse"]) == 2
    assert "diag/outlier_dims" in full["summary"]


def test_analyze_needs_heldout_text(ckpt, tmp_path):
    with pytest.raises(UserError, match="needs held-out text"):
        analyze([str(ckpt), "--out", str(tmp_path), "--tokenizer", str(ckpt / "tok.model")])
