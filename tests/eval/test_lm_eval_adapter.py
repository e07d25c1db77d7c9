"""The lm-eval adapter on a local JSON task, offline (skipped without the lm-eval extra)."""

import dataclasses
import json

import pytest

from rayq.eval import evaluate, load_task
from rayq.schema import EvalConfig

YAML = """task: rayq_toy_cloze
dataset_path: json
dataset_kwargs:
  data_files: {data}
output_type: multiple_choice
test_split: train
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture()
def offline_lm_eval(tmp_path, monkeypatch):
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                       "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, value)
    return pytest.importorskip("lm_eval")


def _toy_task(gpt, tmp_path, size=16):
    task = load_task("heldout-cloze", heldout_texts=gpt.heldout, size=size)
    data = tmp_path / "toy_cloze.jsonl"
    with open(data, "w") as fh:  # lm-eval joins context and choice with its target_delimiter " "
        for item in task.items:
            fh.write(json.dumps({"context": item.contexts[0], "choices": [c[1:] for c in item.continuations],
                                 "label": item.label}) + "\n")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "rayq_toy_cloze.yaml").write_text(YAML.format(data=data))
    return task, tasks_dir


@pytest.mark.parametrize("scheme", [None, "w8a8-vectorwise"])
def test_simple_evaluate_matches_rayq_scoring(offline_lm_eval, trained_gpt, tmp_path, scheme):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from rayq.eval.lm_eval_adapter import RayqLM

    task, tasks_dir = _toy_task(trained_gpt, tmp_path)
    lm = RayqLM(trained_gpt.model, trained_gpt.sp, scheme=scheme, batch_size=8)
    out = simple_evaluate(model=lm, tasks=["rayq_toy_cloze"], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                          num_fewshot=0, bootstrap_iters=0, log_samples=False)
    acc = out["results"]["rayq_toy_cloze"]["acc,none"]
    ours = evaluate(lm.model, [task], EvalConfig(schemes=[]), tokenizer=trained_gpt.sp).fp["heldout-cloze"].metrics["acc"]
    assert acc == pytest.approx(ours) and acc > 0.5


def test_rolling_and_generation(offline_lm_eval, trained_gpt, tmp_path):
    from lm_eval.api.instance import Instance

    from rayq.eval.lm_eval_adapter import RayqLM
    from rayq.eval.scoring import as_tokenizer, rolling_requests, score_tokens

    lm = RayqLM(trained_gpt.model, trained_gpt.sp, batch_size=4, max_gen_toks=12)
    text = trained_gpt.heldout["toy/heldout"][:600]
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (ll,) = lm.loglikelihood_rolling([req])
    tok = as_tokenizer(trained_gpt.sp)
    assert tok.prefix_id == trained_gpt.sp.eos_id()  # documents start after EOS in the training stream
    windows = rolling_requests(tok.encode(text), 64, tok.prefix_id)
    assert ll == pytest.approx(sum(s.logprob for s in score_tokens(trained_gpt.model, windows)))
    gen = Instance("generate_until", {}, ("Tom has a red ball. Tom goes to the", {"until": ["."], "max_gen_toks": 12}), 0)
    (completion,) = lm.generate_until([gen])
    assert "." not in completion and completion.strip()  # the toy model names a place, then stops at "."


def test_from_checkpoint_serves_a_checkpoint(offline_lm_eval, trained_gpt, tmp_path):
    from lm_eval.api.instance import Instance

    from rayq import checkpoint
    from rayq.eval.lm_eval_adapter import from_checkpoint
    from rayq.schema import Config

    checkpoint.write(tmp_path / "step_1", model_state=trained_gpt.model.state_dict(), optim_state=None,
                     trainer_state={"step": 1}, cfg=Config(model=trained_gpt.cfg))
    (tmp_path / "tok.model").write_bytes(trained_gpt.proto)
    lm = from_checkpoint(str(tmp_path / "step_1"), tokenizer=str(tmp_path / "tok.model"))
    req = Instance("loglikelihood", {}, ("Tom says thank you to", " Ann"), 0)
    ((ll, greedy),) = lm.loglikelihood([req])
    assert ll < 0 and isinstance(greedy, bool)


ROLLING_YAML = """task: rayq_toy_rolling
dataset_path: json
dataset_kwargs:
  data_files: {data}
output_type: loglikelihood_rolling
test_split: train
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _checkpoint_run(trained_gpt, tmp_path):
    """A run directory as `rayq train` leaves it: checkpoints/step_1 plus the tokenizer it carries."""
    from rayq import checkpoint
    from rayq.schema import Config

    run = tmp_path / "run"
    checkpoint.write(run / "checkpoints" / "step_1", model_state=trained_gpt.model.state_dict(), optim_state=None,
                     trainer_state={"step": 1}, cfg=Config(model=trained_gpt.cfg))
    (run / "tokenizer.model").write_bytes(trained_gpt.proto)
    return run


def test_cli_route_runs_fp_and_w8a8_on_local_tasks(offline_lm_eval, trained_gpt, tmp_path, monkeypatch):
    """`rayq lm-eval` = lm-eval's own CLI: local YAML tasks (multiple choice + rolling), FP and W8A8 in
    separate result folders named after the checkpoint, the numbers equal to rayq's own scoring."""
    from rayq.cli import main

    task, tasks_dir = _toy_task(trained_gpt, tmp_path)
    rolling = tmp_path / "toy_rolling.jsonl"
    rolling.write_text("".join(json.dumps({"text": t}) + "\n" for t in trained_gpt.heldout["toy/heldout"].split("\n\n")[:4] if t))
    (tasks_dir / "rayq_toy_rolling.yaml").write_text(ROLLING_YAML.format(data=rolling))
    _checkpoint_run(trained_gpt, tmp_path)
    monkeypatch.chdir(tmp_path)  # the results folder is named after the checkpoint path as given
    out = tmp_path / "results"
    rc = main(["lm-eval", "--schemes", "fp,w8a8-vectorwise", "--model_args", "checkpoint=run", "--batch_size", "auto",
               "--tasks", "rayq_toy_cloze,rayq_toy_rolling", "--include_path", str(tasks_dir),
               "--output_path", str(out), "--limit", "12", "--log_samples"])
    assert rc == 0
    results = {}
    for scheme in ("fp", "w8a8-vectorwise"):
        files = list((out / scheme / "run").glob("results_*.json"))
        assert len(files) == 1, f"{scheme}: {list((out / scheme).rglob('*'))}"
        results[scheme] = json.loads(files[0].read_text())["results"]
        assert list((out / scheme / "run").glob("samples_rayq_toy_cloze_*.jsonl"))  # --log_samples honoured
    first12 = dataclasses.replace(task, items=task.items[:12])  # --limit 12: lm-eval scores the first 12
    ours = evaluate(trained_gpt.model, [first12], EvalConfig(schemes=[]), tokenizer=trained_gpt.sp).fp["heldout-cloze"].metrics["acc"]
    assert results["fp"]["rayq_toy_cloze"]["acc,none"] == pytest.approx(ours)
    for scheme, res in results.items():
        assert 0.0 <= res["rayq_toy_cloze"]["acc,none"] <= 1.0
        assert res["rayq_toy_rolling"]["word_perplexity,none"] > 1.0
    fp_ppl = results["fp"]["rayq_toy_rolling"]["word_perplexity,none"]
    q_ppl = results["w8a8-vectorwise"]["rayq_toy_rolling"]["word_perplexity,none"]
    assert q_ppl != fp_ppl and abs(q_ppl / fp_ppl - 1) < 0.05  # quantized for real, and only slightly worse


def test_import_registers_the_model_for_lm_eval(offline_lm_eval, trained_gpt, tmp_path):
    """After `import rayq.eval.lm_eval_adapter`, lm-eval finds "rayq" by name (pretrained= and checkpoint= alike)."""
    from lm_eval.api.registry import get_model, model_registry

    import rayq.eval.lm_eval_adapter  # noqa: F401

    run = _checkpoint_run(trained_gpt, tmp_path)
    cls = get_model("rayq")
    for key in ("pretrained", "checkpoint"):
        lm = cls.create_from_arg_string(f"{key}={run}", {"batch_size": "auto", "device": None})
        assert lm.batch_size >= 1 and lm.scheme is None
        assert str(next(lm.model.parameters()).device) == "cpu"  # no CUDA here: CPU, not an error
    assert "hf" in model_registry  # lm-eval's own models are still listed beside rayq


def test_lm_eval_argv_rewrites_only_what_rayq_adds():
    from rayq.eval.lm_eval_cli import lm_eval_argv

    assert lm_eval_argv(["--tasks", "piqa", "-a", "checkpoint=runs/x,scheme=w4-colwise"]) == [
        ["run", "--model", "rayq", "--tasks", "piqa", "-a", "pretrained=runs/x,scheme=w4-colwise"]]
    runs = lm_eval_argv(["run", "--schemes", "fp,w8a8-tensor", "--model_args", '{"checkpoint": "r"}', "-o", "out"])
    assert runs == [["run", "--model", "rayq", "--model_args", '{"pretrained": "r"}', "-o", "out/fp", "--model_args", "scheme=fp"],
                    ["run", "--model", "rayq", "--model_args", '{"pretrained": "r"}', "-o", "out/w8a8-tensor",
                     "--model_args", "scheme=w8a8-tensor"]]
    assert lm_eval_argv(["ls", "tasks"]) == [["ls", "tasks"]]
    assert lm_eval_argv(["--model", "hf", "--tasks", "x"])[0][:3] == ["run", "--model", "hf"]
