import json
import math
from pathlib import Path

import pytest
import torch

from rayq import checkpoint as ckpt_io
from rayq import config as config_io
from rayq.errors import UserError
from rayq.train import LocalReporter, lr_at, run

GOLDEN = Path(__file__).with_name("golden_tiny_loss.json")


def _cfg(base, **values):
    return config_io.with_values(base, values)


def test_golden_10_step_loss_curve(tiny_setup, tmp_path):
    """The tiny preset's first 10 losses on the test corpus, checked in: guards the train loop."""
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 10, "train.log_every": 1, "recipe.precision": "fp32"})
    result = run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    losses = [m["train/loss"] for m in result.history]
    golden = json.loads(GOLDEN.read_text())
    assert len(losses) == 10
    assert losses == pytest.approx(golden["loss"], rel=2e-3), losses
    assert losses[-1] < losses[0]


def test_run_directory_layout_and_metrics(tiny_setup, tmp_path):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 20, "train.checkpoint_every": 10, "train.eval_every": 10})
    run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    assert config_io.resolve(config_file=tmp_path / "config.yaml") == cfg
    assert [s for s, _ in ckpt_io.list_steps(tmp_path / "checkpoints")] == [10, 20]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {"step", "train/loss", "train/tokens_per_s", "train/grad_norm", "train/loss_scale", "train/skipped_steps"}
    assert all(keys <= set(r) for r in rows)
    assert "eval/loss" in rows[-1] and rows[-1]["checkpoint_path"].endswith("step_20")
    saved = ckpt_io.load(tmp_path / "checkpoints" / "step_20")
    assert saved["config"] == cfg and saved["trainer"]["step"] == 20


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_bit_exact(tiny_setup, tmp_path, precision):
    """Interrupt at step 10, resume to 20: the same losses and weights as an uninterrupted run."""
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 20, "train.log_every": 1, "train.checkpoint_every": 10,
                        "recipe.dropout": 0.1, "recipe.precision": precision})
    full = run(cfg, LocalReporter(tmp_path / "full", cfg, echo=False), data=data)
    first = run(cfg, LocalReporter(tmp_path / "split", cfg, echo=False), data=data, stop_at=10)
    assert first.step == 10
    second = run(cfg, LocalReporter(tmp_path / "split", cfg, echo=False), data=data)
    assert [m["train/loss"] for m in second.history] == [m["train/loss"] for m in full.history[10:]]
    a = torch.load(full.checkpoint / "model.pt", weights_only=True)
    b = torch.load(second.checkpoint / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_uses_loss_scaling_and_reports_it(tiny_setup, tmp_path):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 5, "train.log_every": 5, "recipe.precision": "fp16"})
    result = run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    assert result.last_metrics["train/loss_scale"] > 1 and math.isfinite(result.last_metrics["train/loss"])


def test_divergence_ends_cleanly_with_last_good_checkpoint(tiny_setup, tmp_path):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 30, "recipe.lr": 1e6, "recipe.grad_clip": None, "recipe.warmup_steps": 0,
                        "train.checkpoint_every": 1, "recipe.precision": "fp32"})
    result = run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    assert result.diverged and result.step < 30
    assert result.history[-1]["diverged"] == 1
    steps = [s for s, _ in ckpt_io.list_steps(tmp_path / "checkpoints")]
    assert steps and max(steps) < result.step  # the non-finite state was never checkpointed
    last = ckpt_io.load(tmp_path / "checkpoints" / f"step_{max(steps)}")
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_corrupted_checkpoint_is_a_clear_error(tiny_setup, tmp_path):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 5, "train.checkpoint_every": 5})
    run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    step_dir = tmp_path / "checkpoints" / "step_5"
    (step_dir / "trainer.pt").rename(tmp_path / "trainer.pt")
    with pytest.raises(UserError, match=r"trainer\.pt: checkpoint file missing"):
        ckpt_io.load(step_dir)
    (tmp_path / "trainer.pt").rename(step_dir / "trainer.pt")
    model_pt = step_dir / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:100])
    with pytest.raises(UserError, match=r"model\.pt: corrupted or truncated"):
        ckpt_io.load(step_dir)


def test_lr_schedule():
    cfg = config_io.resolve("tiny", overrides=["recipe.steps=100", "recipe.warmup_steps=10", "recipe.lr=1.0",
                                               "recipe.min_lr_ratio=0.1"])
    assert lr_at(5, cfg.recipe) == pytest.approx(0.5)
    assert lr_at(10, cfg.recipe) == pytest.approx(1.0)
    assert lr_at(100, cfg.recipe) == pytest.approx(0.1)
    assert all(lr_at(s, cfg.recipe) >= lr_at(s + 1, cfg.recipe) for s in range(10, 100))


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = config_io.resolve("tiny", overrides=["recipe.steps=100", "recipe.warmup_steps=10", "recipe.lr=1.0",
                                               "recipe.min_lr_ratio=0.1", "recipe.schedule=wsd",
                                               "recipe.decay_fraction=0.2"])
    assert lr_at(5, cfg.recipe) == pytest.approx(0.5)
    assert [lr_at(s, cfg.recipe) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
    assert lr_at(90, cfg.recipe) == pytest.approx(0.55)
    assert lr_at(100, cfg.recipe) == pytest.approx(0.1)
    assert all(lr_at(s, cfg.recipe) > lr_at(s + 1, cfg.recipe) for s in range(80, 100))
    with pytest.raises(UserError, match="decay_fraction"):
        config_io.resolve("tiny", overrides=["recipe.decay_fraction=0"])


def test_clip_fraction_and_data_metrics_are_reported(tiny_setup, tmp_path):
    base, data = tiny_setup
    values = {"recipe.steps": 12, "train.log_every": 4, "recipe.precision": "fp32"}
    tight = run(_cfg(base, **values, **{"recipe.grad_clip": 1e-6}), LocalReporter(tmp_path / "a", base, echo=False),
                data=data)
    loose = run(_cfg(base, **values, **{"recipe.grad_clip": 1e6}), LocalReporter(tmp_path / "b", base, echo=False),
                data=data)
    off = run(_cfg(base, **values, **{"recipe.grad_clip": None}), LocalReporter(tmp_path / "c", base, echo=False),
              data=data)
    assert [m["train/clip_frac"] for m in tight.history] == [1.0, 1.0, 1.0]
    assert [m["train/clip_frac"] for m in loose.history] == [0.0, 0.0, 0.0]
    assert [m["train/clip_frac"] for m in off.history] == [0.0, 0.0, 0.0]
    tokens = data.num_tokens("train")
    per_step = base.recipe.batch_size * base.model.seq_len
    assert all(m["data/tokens"] == tokens for m in tight.history)
    assert [m["data/epochs"] for m in tight.history] == pytest.approx([s * per_step / tokens for s in (4, 8, 12)])


def test_decay_norm_gains_decays_layernorm_gains_only(tiny_setup):
    from rayq.model import GPT, param_groups
    from rayq.train import build_optimizer

    base, _ = tiny_setup
    model = GPT(base.model)
    gains = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for flag in (False, True):
        decayed, kept = param_groups(model, 0.1, decay_norm_gains=flag)
        ids, kept_ids = {id(p) for p in decayed["params"]}, {id(p) for p in kept["params"]}
        assert ids.isdisjoint(kept_ids) and ids | kept_ids == {id(p) for p in model.parameters()}
        assert (gains <= ids) if flag else gains.isdisjoint(ids)
        assert all(p.dim() >= 2 or id(p) in gains for p in decayed["params"])  # biases are never decayed
    # one AdamW step with zero gradients: only the decay moves a weight, by lr * weight_decay
    for flag, expected in ((True, 1 - 0.1 * 0.5), (False, 1.0)):
        model = GPT(base.model)
        opt = build_optimizer(model, _cfg(base, **{"recipe.decay_norm_gains": flag, "recipe.weight_decay": 0.5,
                                                   "recipe.lr": 0.1}).recipe)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.allclose(model.ln_f.weight, torch.full_like(model.ln_f.weight, expected))
        assert torch.equal(model.ln_f.bias, torch.zeros_like(model.ln_f.bias))
