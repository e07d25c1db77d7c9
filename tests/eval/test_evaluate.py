"""evaluate() and the train loop's hook, on a tiny GPT trained in the session fixture."""

import copy
import math

import numpy as np
import pytest
import torch

from rayq import metrics as metric_names
from rayq.errors import UserError
from rayq.eval import evaluate, load_tasks, make_eval_hook, token_batches
from rayq.schema import Config, EvalConfig


def _ecfg(schemes=(), **kw):
    return EvalConfig(schemes=list(schemes), **kw)


def _tasks(gpt, size=64):
    return load_tasks(["heldout-lambada", "heldout-cloze", "heldout-ppl"], {}, heldout_texts=gpt.heldout, size=size)


def _kl_batches(gpt, n_tokens=2048):
    return token_batches(gpt.sp.encode(gpt.heldout["toy/heldout"]), n_tokens, gpt.cfg.seq_len, 16)


def _noisy_quantizer(scale=0.02):
    """Stands in for a scheme: a perturbed deep copy (deterministic)."""
    def quantize(model, scheme):
        q = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in q.named_parameters():
                if name.endswith(("qkv.weight", "fc_in.weight")):
                    p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
        return q
    return quantize


def test_builtin_tasks_score_well_above_chance(trained_gpt):
    result = evaluate(trained_gpt.model, _tasks(trained_gpt), _ecfg(batch_size=32), tokenizer=trained_gpt.sp)
    m = result.metrics()
    # chance: ~0 for an exact last word out of a 320-piece vocabulary, 0.25 for 1-of-4 cloze
    assert m["fp/heldout-lambada/acc"] > 0.3
    assert m["fp/heldout-cloze/acc_norm"] > 0.5
    assert m["fp/heldout-ppl/bpb"] < 1.0  # a byte of toy text costs well under 1 bit
    # each metric under its own name: the cloze task's primary acc_norm is never reported as acc
    cloze = result.fp["heldout-cloze"]
    assert cloze.primary == "acc_norm" and m["fp/heldout-cloze/acc_norm"] == cloze.score
    assert m["fp/heldout-cloze/acc"] == cloze.metrics["acc"]
    # fp/<m> averages m only, never acc with acc_norm
    assert m["fp/acc"] == pytest.approx((m["fp/heldout-lambada/acc"] + m["fp/heldout-cloze/acc"]) / 2)
    assert m["fp/acc_norm"] == m["fp/heldout-cloze/acc_norm"]
    assert "fp/heldout-ppl/acc" not in m  # perplexity tasks do not enter fp/acc


def test_w8a8_vectorwise_degradation_and_kl_with_ci_real_kernels(trained_gpt):
    model = trained_gpt.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate(model, _tasks(trained_gpt), _ecfg(["w8a8-vectorwise"], bootstrap_samples=300, batch_size=32),
                      tokenizer=trained_gpt.sp, kl_batches=_kl_batches(trained_gpt))
    m = result.metrics()
    p = "ptq/w8a8-vectorwise"
    assert m[f"{p}/degradation_pct_ci_low"] <= m[f"{p}/degradation_pct"] <= m[f"{p}/degradation_pct_ci_high"]
    assert abs(m[f"{p}/degradation_pct"]) < 10  # W8A8 vector-wise barely moves a model this small
    assert 0 < m[f"{p}/kl"] < 1e-2 and 0 < m[f"{p}/kl_se"] < m[f"{p}/kl"]
    assert 0.95 < m[f"{p}/top1_agree"] <= 1.0
    r = result.schemes["w8a8-vectorwise"]
    assert r.kl.tokens == 2048 and r.degradation_tasks == ["heldout-lambada", "heldout-cloze"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # FP model untouched
    assert all(type(mod).__name__ == "Linear" for n, mod in model.named_modules() if n.endswith("attn.qkv"))


def test_unknown_scheme_is_a_user_error_with_suggestion(trained_gpt):
    with pytest.raises(UserError, match="did you mean 'w8a8-vectorwise'"):
        evaluate(trained_gpt.model, [], _ecfg(["w8a8-vectorwse"]))


def test_evaluate_metric_names_and_result_with_a_stand_in_quantizer(trained_gpt):
    model = trained_gpt.model
    model.train()  # the train loop hands over a model in train mode; it must come back that way
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = _tasks(trained_gpt, size=24)
    result = evaluate(model, tasks, _ecfg(["noisy"], bootstrap_samples=100, diagnostics=True), tokenizer=trained_gpt.sp,
                      kl_batches=_kl_batches(trained_gpt, 512), quantizer=_noisy_quantizer(0.5))
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    m = result.metrics()
    expected = {
        "fp/acc", "fp/acc_norm", "fp/acc_bytes", "fp/heldout-lambada/acc", "fp/heldout-lambada/ppl",
        "fp/heldout-cloze/acc", "fp/heldout-cloze/acc_norm", "fp/heldout-cloze/acc_bytes",
        "fp/heldout-ppl/bpb", "fp/heldout-ppl/ppl",
        "q/noisy/acc", "q/noisy/acc_norm", "q/noisy/heldout-lambada/acc", "q/noisy/heldout-lambada/ppl",
        "q/noisy/heldout-cloze/acc", "q/noisy/heldout-cloze/acc_norm", "q/noisy/heldout-ppl/bpb",
        "q/noisy/heldout-ppl/ppl",
        "ptq/noisy/degradation_pct", "ptq/noisy/degradation_pct_ci_low", "ptq/noisy/degradation_pct_ci_high",
        "ptq/noisy/kl", "ptq/noisy/kl_se", "ptq/noisy/top1_agree", "ptq/noisy/top1_agree_se",
    }
    assert expected <= set(m) and all(k.startswith(("fp/", "q/", "ptq/", "diag/")) for k in m)
    # the search accepts every name the evaluator reports (one vocabulary: rayq.metrics)
    assert [k for k in m if not metric_names.is_objective(k, [t.name for t in tasks], ["noisy"])] == []
    assert all(isinstance(v, float) for v in m.values())
    assert {"diag/qkv_rmse_mean", "diag/outlier_dims", "diag/spectral_norm_max"} <= set(m)
    assert m["ptq/noisy/kl"] > 0 and m["q/noisy/heldout-ppl/bpb"] > m["fp/heldout-ppl/bpb"]
    # degradation consistent with the per-task scores of each task's primary metric
    fp = [m["fp/heldout-lambada/acc"], m["fp/heldout-cloze/acc_norm"]]
    q = [m["q/noisy/heldout-lambada/acc"], m["q/noisy/heldout-cloze/acc_norm"]]
    assert m["ptq/noisy/degradation_pct"] == pytest.approx(np.mean([(b - a) / a * 100 for a, b in zip(fp, q)]))
    doc = result.to_dict()
    assert doc["schemes"]["noisy"]["kl"]["tokens"] == 512 and doc["fp"]["heldout-cloze"]["n"] == 24


def test_degradation_skips_tasks_with_zero_fp_score():
    from eval_helpers import BigramLM, CharTokenizer

    from rayq.eval import MultipleChoice, Task
    from rayq.eval.tasks import MULTIPLE_CHOICE

    lose = Task("lose", MULTIPLE_CHOICE, "acc", (MultipleChoice(("a",) * 2, (" the", " zzq"), 1),), "t")
    win = Task("win", MULTIPLE_CHOICE, "acc", (MultipleChoice(("a",) * 2, (" the", " zzq"), 0),), "t")
    result = evaluate(BigramLM(), [lose, win], _ecfg(["same"], bootstrap_samples=20), tokenizer=CharTokenizer(),
                      quantizer=lambda m, s: m)
    assert result.schemes["same"].degradation_tasks == ["win"]
    assert result.metrics()["ptq/same/degradation_pct"] == 0.0
    only_lose = evaluate(BigramLM(), [lose], _ecfg(["same"]), tokenizer=CharTokenizer(), quantizer=lambda m, s: m)
    assert math.isnan(only_lose.metrics()["ptq/same/degradation_pct"])


class _FakePrepared:
    """Duck-types rayq.data.PreparedData: tokenizer(), heldout_texts(), tokens("heldout")."""

    def __init__(self, gpt):
        self.gpt = gpt

    def tokenizer(self):
        return self.gpt.sp

    def heldout_texts(self):
        return dict(self.gpt.heldout)

    def tokens(self, split):
        assert split == "heldout"
        return np.array(self.gpt.sp.encode(self.gpt.heldout["toy/heldout"]), dtype=np.int32)


def test_make_eval_hook_from_config_and_prepared_data(trained_gpt):
    cfg = Config(model=trained_gpt.cfg, eval=EvalConfig(tasks=["heldout-lambada", "heldout-cloze"], task_size=16,
                                                        kl_tokens=512, bootstrap_samples=50, schemes=["noisy"]))
    hook = make_eval_hook(cfg, _FakePrepared(trained_gpt), quantizer=_noisy_quantizer())
    assert [t.name for t in hook.inputs.tasks] == ["heldout-lambada", "heldout-cloze"]
    assert sum(b.shape[0] for b in hook.inputs.kl_batches) * trained_gpt.cfg.seq_len == 512
    m = hook(trained_gpt.model, 10, None)
    assert {"fp/acc", "ptq/noisy/kl", "ptq/noisy/degradation_pct_ci_high", "eval/seconds"} <= set(m)
    # the same items at every call: same metrics for the same model
    assert hook(trained_gpt.model, 20, None)["fp/acc"] == m["fp/acc"]


def test_make_eval_hook_from_explicit_parts_and_policy(trained_gpt):
    from rayq.precision import PrecisionPolicy
    from rayq.schema import RecipeConfig

    cfg = Config(model=trained_gpt.cfg, eval=EvalConfig(tasks=["heldout-cloze"], task_size=8, kl_tokens=128,
                                                        bootstrap_samples=10, schemes=[]))
    hook = make_eval_hook(cfg, tokenizer=trained_gpt.sp, heldout_texts=trained_gpt.heldout)
    policy = PrecisionPolicy.from_recipe(RecipeConfig(precision="bf16"), "cpu")
    m = hook(trained_gpt.model, 1, policy)
    assert set(m) == {"fp/acc", "fp/acc_norm", "fp/acc_bytes", "fp/heldout-cloze/acc", "fp/heldout-cloze/acc_norm",
                      "fp/heldout-cloze/acc_bytes", "eval/seconds"}
    assert m["fp/acc_norm"] == m["fp/heldout-cloze/acc_norm"] and m["fp/acc_bytes"] == m["fp/heldout-cloze/acc_bytes"]
    with pytest.raises(UserError, match="needs a tokenizer"):
        make_eval_hook(cfg)


def test_kl_batches_start_with_bos_when_the_data_does(tiny_setup):
    """A model trained with data.bos sees BOS first in every sequence: so do its KL batches."""
    from rayq import config as config_io
    from rayq import data as data_io
    from rayq.eval import eval_inputs

    base, plain = tiny_setup
    cfg = config_io.with_values(base, {"data.bos": True, "eval.kl_tokens": 512})
    with_bos = data_io.prepare(cfg.data, cfg.model.vocab_size)
    batches = eval_inputs(cfg, with_bos).kl_batches
    assert batches and all(b.shape[1] == cfg.model.seq_len and (b[:, 0] == with_bos.window_bos).all() for b in batches)
    assert not any((b[:, 0] == data_io.SPM_BOS_ID).all() for b in eval_inputs(base, plain).kl_batches)
