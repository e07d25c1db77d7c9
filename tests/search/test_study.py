"""`rayq study`: the gates read from a study's results rows (synthetic rows isolate the logic; the
real searches write the same columns), and the command on a real results.parquet."""

from __future__ import annotations

import json
import math

import pytest

from rayq.cli import main
from rayq.config import dump_yaml, resolve
from rayq.search import study
from rayq.search.results import write_table

KL = "ptq/w8a8-tensor/kl"


def _run(lr, seed, kl0, growth, losses, evals=None, **config):
    """Rows of one recipe-seed: train/loss every 100 steps, KL and eval/loss every 300."""
    rows = []
    for i, loss in enumerate(losses):
        step = 100.0 * (i + 1)
        row = {"trial_id": f"t{lr}-{seed}-{sorted(config.items())}", "step": step, "config/recipe.lr": lr,
               "config/train.seed": float(seed), "train/loss": loss, "data/tokens": 1e7, "data/epochs": step * 4096 / 1e7,
               **{f"config/{k}": v for k, v in config.items()}}
        if step % 300 == 0:
            row[KL] = kl0 * growth ** (step / 300)
            row["eval/loss"] = (evals or {}).get(step, loss)
            row["eval/seconds"] = 20.0
        elif rows:  # a search carries its objectives forward between evaluations
            row[KL], row["eval/loss"] = rows[-1].get(KL), rows[-1].get("eval/loss")
        rows.append(row)
    return rows


SMOOTH = [6.0 - 0.1 * i for i in range(12)]


def test_regime_finds_growth_and_the_largest_stable_lr():
    spiky = list(SMOOTH)
    spiky[7] = spiky[6] + 0.5  # a 0.5-nat spike at step 800
    rows = (_run(1e-3, 0, 1e-5, 1.3, SMOOTH) + _run(1e-2, 0, 1e-5, 1.5, SMOOTH)
            + _run(3e-2, 0, 1e-5, 1.8, spiky))
    doc = study.regime(rows, [KL], warmup_steps=200)
    assert doc["kl_grows_with_training"] is True
    assert doc["stress_lr"] == 1e-2 and doc["gate_passed"] is True
    spiked = [r for r in doc["runs"].values() if r["lr"] == 3e-2][0]
    assert spiked["spikes"] == [800.0] and not spiked["stable"]


def test_regime_fails_when_kl_does_not_grow_or_eval_diverges():
    flat = _run(1e-3, 0, 1e-5, 1.0, SMOOTH)  # constant KL: no rank correlation
    assert study.regime(flat, [KL])["kl_grows_with_training"] is False
    rising = _run(1e-2, 0, 1e-5, 1.3, SMOOTH, evals={600.0: 5.0, 900.0: 5.2})
    assert study.regime(rising, [KL])["runs"]["recipe seed=0"]["eval_diverges"] is True


def _contrast_rows(seeds, noise):
    rows = []
    for k, eps in zip(range(seeds), noise):
        rows += _run(3e-2, k, 1e-4 * math.exp(eps), 1.2, SMOOTH, **{"recipe.dropout": 0.1})
        rows += _run(1e-2, k, 1e-5, 1.2, SMOOTH, **{"recipe.dropout": 0.0})
    return rows


def test_contrast_measures_paired_separation_in_seed_sds():
    rows = _contrast_rows(3, [0.0, 0.1, -0.1])
    labels = sorted({label for label, _ in study.curves(rows, KL)})
    averse = [lab for lab in labels if "dropout=0.0" in lab][0]
    reading = study.contrast(rows, averse, KL, ["eval/loss"])
    sep = next(iter(reading["separations"].values()))
    assert reading["step"] == 1200.0 and sep["seeds"] == 3
    assert sep["ratio"] == pytest.approx(10.0, rel=0.01)  # log(10) apart, seed noise +-0.1
    assert sep["separation_sds"] == pytest.approx(math.log(10) / 0.1, rel=0.01) and sep["separates"]
    assert sep["more_damaged"] == next(lab for lab in labels if lab != averse)
    in_progress = _run(3e-2, 3, 1e-4, 1.2, SMOOTH[:4], **{"recipe.dropout": 0.1})  # seed 3: step 400 so far
    assert study.contrast(rows + in_progress, averse, KL, [])["separations"] == reading["separations"]
    summary = study.summary(rows, reading, parameters=1000)
    assert summary["gate_passed"] is True and summary["seeds"] == 3
    assert summary["tokens_per_param"] == pytest.approx(1200 * 4096 / 1000)
    assert set(summary["ordering"]) == set(labels)
    early = study.summary(rows, study.contrast(rows, averse, KL, [], step=600.0), parameters=1000)
    assert early["step"] == 600.0  # the data regime of the step read, not of the whole run
    assert early["tokens_per_param"] == pytest.approx(600 * 4096 / 1000)
    assert early["epochs"] == pytest.approx(600 * 4096 / 1e7)


def test_two_seeds_never_pass_the_gate_and_noise_does_not_separate():
    two = study.contrast(_contrast_rows(2, [0.0, 0.1]), "dropout=0.0 lr=0.01", KL, [])
    assert next(iter(two["separations"].values()))["separates"] is False  # MIN_SEEDS = 3
    noisy = study.contrast(_contrast_rows(3, [0.0, -4.0, -0.5]), "dropout=0.0 lr=0.01", KL, [])
    assert next(iter(noisy["separations"].values()))["separates"] is False


def test_study_command_reads_a_search_directory(tmp_path, capsys):
    d = tmp_path / "lr"
    d.mkdir()
    write_table(_run(1e-3, 0, 1e-5, 1.3, SMOOTH) + _run(1e-2, 0, 1e-5, 1.5, SMOOTH), d / "results.parquet")
    (d / "config.yaml").write_text(dump_yaml(resolve(preset="tiny")))
    assert main(["study", "regime", str(d), "--out", str(tmp_path / "a.json")]) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["stress_lr"] == 1e-2 and doc["gate"] == "A"
    assert json.loads(capsys.readouterr().out) == doc
    assert main(["study", "contrast", str(tmp_path / "missing")]) == 2
    assert "no results here" in capsys.readouterr().err


def test_loss_matched_reads_damage_at_equal_eval_loss():
    # the reference trains to losses 6.0..4.9 with KL 1e-5 growing 1.2x per evaluation
    ref = _run(1e-2, 0, 1e-5, 1.2, SMOOTH, **{"recipe.dropout": 0.0})
    inside = _run(3e-2, 0, 1e-3, 1.0, [5.55] * 12, **{"recipe.dropout": 0.1})  # loss 5.55: the reference's step 500-600
    reading = study.loss_matched(ref + inside, "dropout=0.0 lr=0.01", KL, 1200.0)
    seed0 = next(iter(reading["recipes"].values()))["seeds"]["0"]
    # the reference evaluated at 300 (loss 5.8) and 600 (5.5): 5.55 lies 5/6 of the way, in loss
    at = math.exp(math.log(1e-5 * 1.2) + 5 / 6 * (math.log(1e-5 * 1.2 ** 2) - math.log(1e-5 * 1.2)))
    assert seed0["kind"] == "interpolated" and seed0["ratio"] == pytest.approx(1e-3 / at)
    untrained = _run(3e-2, 0, 1e-3, 1.0, [6.5] * 12, **{"recipe.dropout": 0.1})  # worse than any reference eval
    bound = next(iter(study.loss_matched(ref + untrained, "dropout=0.0 lr=0.01", KL, 1200.0)["recipes"].values()))
    assert bound["kind"] == "at_least" and bound["ratio_geomean"] == pytest.approx(1e-3 / (1e-5 * 1.2))
    better = _run(3e-2, 0, 1e-3, 1.0, [4.0] * 12, **{"recipe.dropout": 0.1})
    capped = next(iter(study.loss_matched(ref + better, "dropout=0.0 lr=0.01", KL, 1200.0)["recipes"].values()))
    assert capped["kind"] == "at_most" and capped["ratio_geomean"] == pytest.approx(1e-3 / (1e-5 * 1.2 ** 4))


def test_study_contrast_plots_and_reads_against_loss(tmp_path, capsys):
    d = tmp_path / "contrast"
    d.mkdir()
    write_table(_contrast_rows(3, [0.0, 0.1, -0.1]), d / "results.parquet")
    (d / "config.yaml").write_text(dump_yaml(resolve(preset="tiny")))
    png = tmp_path / "contrast.png"
    assert main(["study", "contrast", str(d), "--reference", "dropout=0.0 lr=0.01", "--plot", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(doc["loss_matched"]["recipes"]) == {"dropout=0.1 lr=0.03"}
