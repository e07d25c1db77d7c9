"""Evaluation on CUDA: the train loop's INT8 evaluator scores a model living on the GPU (CUDA
`_int_mm` inside), and its FP and W8A8 figures agree with the same model scored on CPU."""

import copy
import math

import pytest
import torch

from rayq import config as config_io
from rayq.eval import make_eval_hook
from rayq.precision import PrecisionPolicy
from rayq.train import LocalReporter, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_in_loop_evaluation_on_cuda_matches_cpu(tiny_setup, tmp_path):
    cfg, data = tiny_setup
    cfg = config_io.with_values(cfg, {"recipe.steps": 30, "train.eval_every": 0, "train.checkpoint_every": 30,
                                      "recipe.precision": "fp32", "eval.schemes": ["w8a8-vectorwise"]})
    hook = make_eval_hook(cfg, data)
    result = run(cfg, LocalReporter(tmp_path / "run", cfg, echo=False), data=data, evaluator=hook, device="cuda")
    on_gpu = result.last_metrics  # the loop ran the hook on the CUDA model at the last step
    assert "ptq/w8a8-vectorwise/kl" in on_gpu and math.isfinite(on_gpu["ptq/w8a8-vectorwise/kl"])

    from rayq import checkpoint as ckpt_io
    from rayq.train import build_model

    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(ckpt_io.load(result.checkpoint, with_optimizer=False)["model"])
    policy = PrecisionPolicy.from_recipe(cfg.recipe, "cpu")
    on_cpu = hook(model, 30, policy)
    on_gpu_again = hook(copy.deepcopy(model).cuda(), 30, PrecisionPolicy.from_recipe(cfg.recipe, "cuda"))
    for metrics in (on_gpu, on_gpu_again):
        assert metrics["fp/acc"] == pytest.approx(on_cpu["fp/acc"], abs=2 / cfg.eval.task_size)
        # KL(FP||W8A8) is ~1e-5 nats; float order and rounding at quantization thresholds differ
        assert metrics["ptq/w8a8-vectorwise/kl"] == pytest.approx(on_cpu["ptq/w8a8-vectorwise/kl"], rel=0.25)
