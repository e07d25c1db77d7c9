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


def _copy_checkpoint(ckpt, tmp_path):
    import shutil

    dest = tmp_path / "step_300"
    shutil.copytree(ckpt / "checkpoints" / "step_300", dest)
    return dest


def test_damaged_checkpoints_are_one_line_exit_2(ckpt, tmp_path, capsys):
    import torch

    from rayq import cli

    binary = _copy_checkpoint(ckpt, tmp_path / "a")
    (binary / "config.yaml").write_bytes(b"\x80\x04\x95\x00\xff\xfe binary")
    tensor = _copy_checkpoint(ckpt, tmp_path / "b")
    torch.save(torch.zeros(3), tensor / "model.pt")  # a tensor where the state dict belongs
    trainer = _copy_checkpoint(ckpt, tmp_path / "c")
    torch.save(torch.zeros(3), trainer / "trainer.pt")
    cases = [([str(binary)], "config.yaml: not a UTF-8 text file"),
             ([str(tensor)], "model.pt: expected a state dict of tensors, found Tensor"),
             ([str(trainer)], "trainer.pt: expected a dict, found Tensor")]
    if not torch.cuda.is_available():
        cases.append(([str(ckpt), "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        assert cli.main(["eval", *argv, *_data_args(ckpt)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_eval_output_path_and_limit(ckpt, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    assert eval_([str(ckpt), "--limit", "5", "--output-path", str(out), "--bootstrap", "20", *_data_args(ckpt)]) == 0
    assert "eval.json" in capsys.readouterr().err
    text = out.read_text()
    assert "NaN" not in text  # strict JSON
    doc = json.loads(text)
    assert doc["step"] == 300 and doc["limit"] == 5
    assert all(t["n"] <= 5 for t in doc["fp"].values())
    (tmp_path / "dir").mkdir()
    assert eval_([str(ckpt), "--limit", "2", "--schemes", "", "--output-path", str(tmp_path / "dir"), *_data_args(ckpt)]) == 0
    assert json.loads((tmp_path / "dir" / "eval_step_300.json").read_text())["limit"] == 2
    with pytest.raises(UserError, match="--limit 0"):
        eval_([str(ckpt), "--limit", "0", *_data_args(ckpt)])


def test_eval_uses_the_tokenizer_the_run_carries(ckpt, tmp_path, capsys):
    """On a machine without the prepared data, the run's tokenizer.model is used."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ckpt / "checkpoints", run / "checkpoints")
    shutil.copy(ckpt / "tok.model", run / "tokenizer.model")
    argv = [str(run), "--tasks", "piqa", "--task-path", f"piqa={FIXTURES / 'piqa' / 'valid.jsonl'}",
            "--schemes", "", "--limit", "4", "--json", "--set", f"data.sources=[{tmp_path}/missing/*.txt]"]
    assert eval_(argv) == 0
    out, err = capsys.readouterr()
    assert "tokenizer.model" in err and json.loads(out)["fp"]["piqa"]["n"] <= 4
