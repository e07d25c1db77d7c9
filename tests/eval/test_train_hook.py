"""The eval hook inside the project's one train loop (`rayq.train.run`) on the shared tiny corpus."""

import math

from rayq import config as config_io
from rayq.eval import make_eval_hook


def test_hook_in_the_train_loop(tiny_setup, tmp_path):
    from rayq.train import LocalReporter, run

    cfg, data = tiny_setup
    schemes = ["w8a8-vectorwise"]
    cfg = config_io.with_values(cfg, {"recipe.steps": 20, "train.eval_every": 10, "train.checkpoint_every": 0,
                                      "eval.task_size": 16, "eval.kl_tokens": 512, "eval.bootstrap_samples": 50,
                                      "eval.schemes": schemes})
    hook = make_eval_hook(cfg, data)
    assert {t.name for t in hook.inputs.tasks} == {"heldout-lambada", "heldout-cloze"}
    result = run(cfg, LocalReporter(tmp_path / "run", cfg, echo=False), data=data, evaluator=hook)
    evals = [m for m in result.history if "fp/acc" in m]
    assert [m["step"] for m in evals] == [10, 20]
    for m in evals:
        assert 0 <= m["fp/acc"] <= 1 and "fp/heldout-cloze/acc" in m
        for s in schemes:
            assert math.isfinite(m[f"ptq/{s}/kl"]) and m[f"ptq/{s}/kl"] >= 0
            assert f"ptq/{s}/degradation_pct_ci_high" in m and f"q/{s}/heldout-lambada/acc" in m
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"fp/acc":') == 2
