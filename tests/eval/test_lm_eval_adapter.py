"""The lm-eval adapter on a local JSON task, offline (skipped without the lm-eval extra)."""

import json

import pytest

from rayq.eval import evaluate, load_task

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
    ours = evaluate(lm.model, [task], tokenizer=trained_gpt.sp).fp["heldout-cloze"].metrics["acc"]
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
