"""The metric vocabulary: builders, and the objective check the search uses."""

import pytest

from rayq import metrics


def test_builders_spell_every_family():
    assert (metrics.STEP, metrics.TRAIN_LOSS, metrics.TOKENS_PER_S, metrics.EVAL_LOSS) == (
        "step", "train/loss", "train/tokens_per_s", "eval/loss")
    assert metrics.fp("piqa", "acc_norm") == "fp/piqa/acc_norm" and metrics.fp(None, "acc") == "fp/acc"
    assert metrics.q("w8a8-vectorwise", "piqa", "acc") == "q/w8a8-vectorwise/piqa/acc"
    assert metrics.q("w8a8-vectorwise", None, "acc_norm") == "q/w8a8-vectorwise/acc_norm"
    assert metrics.ptq("w4-colwise", "degradation_pct_ci_low") == "ptq/w4-colwise/degradation_pct_ci_low"
    assert metrics.ptq("w4-colwise", "top1_agree") == "ptq/w4-colwise/top1_agree"
    assert metrics.diag("spectral_norm_max") == "diag/spectral_norm_max"
    assert metrics.diag("outlier_frac", site="blocks.1.mlp.fc_in") == "diag/blocks.1.mlp.fc_in/outlier_frac"
    assert metrics.seed_checkpoint_path(2) == "checkpoint_path/seed2"


@pytest.mark.parametrize("build, args", [(metrics.train, ("loss_avg",)), (metrics.fp, ("piqa", "accuracy")),
                                         (metrics.ptq, ("s", "kl_mean")), (metrics.eval_, ("acc",))])
def test_the_vocabulary_is_closed(build, args):
    with pytest.raises(ValueError):
        build(*args)


def test_every_listed_objective_is_accepted_and_checked_against_the_config():
    names = metrics.objective_names(["piqa"], ["w8a8-vectorwise"])
    assert all(metrics.is_objective(n, ["piqa"], ["w8a8-vectorwise"]) for n in names)
    assert {"fp/piqa/acc_norm", "q/w8a8-vectorwise/acc", "ptq/w8a8-vectorwise/top1_agree", "eval/loss"} <= set(names)
    assert not metrics.is_objective("fp/hellaswag/acc", ["piqa"], ["w8a8-vectorwise"])  # not an eval task
    assert metrics.is_objective("fp/hellaswag/acc")  # without a config: the shape only
    assert not metrics.is_objective("ptq/w4-colwise/kl", ["piqa"], ["w8a8-vectorwise"])
