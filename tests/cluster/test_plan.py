"""`rayq plan`: memory per device and required throughput, on the shipped cluster files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayq.cli import main as cli_main
from rayq.cluster.commands import cluster_values
from rayq.cluster.plan import ACCELERATORS, GiB, accelerator_for, device_count, make_plan
from rayq.config import resolve, with_values
from rayq.errors import UserError
from rayq.model import count_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"
GPU = str(CONFIGS / "gcp-gpu.rayq.yaml")
TPU = str(CONFIGS / "gcp-tpu.rayq.yaml")


def cfg_on(preset: str, cluster_file: str, **values):
    return resolve(preset=preset, values={**cluster_values(cluster_file), **values})


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli_main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_device_counts_of_the_shipped_files():
    assert device_count(cfg_on("6b", GPU).cluster) == 32
    assert device_count(cfg_on("6b", TPU).cluster) == 64  # one v4 4x4x4 slice: 64 chips on 16 hosts
    two_slices = cfg_on("6b", TPU, **{"cluster.workers": 32}).cluster
    assert device_count(two_slices) == 128
    per_chip = cfg_on("6b", TPU, **{"cluster.workers": 64, "cluster.resources_per_worker": {"TPU": 1}}).cluster
    assert device_count(per_chip) == 64  # one worker per chip: still one slice
    assert accelerator_for(cfg_on("6b", GPU).cluster).name == "A100-80G"
    assert accelerator_for(cfg_on("6b", TPU, **{"cluster.accelerator_type": "TPU-V5LITEPOD",
                                                "cluster.topology": "4x4", "cluster.workers": 4}).cluster).name == "TPU-V5E"


def test_model_state_is_16_bytes_per_param_split_by_fsdp():
    ddp = make_plan(cfg_on("410m", GPU, **{"cluster.sharding": "ddp"}))
    n = count_parameters(resolve(preset="410m").model)
    assert ddp.params == n
    assert (ddp.weights, ddp.grads, ddp.master, ddp.optimizer) == (2 * n, 2 * n, 4 * n, 8 * n)
    fsdp = make_plan(cfg_on("410m", GPU))
    assert fsdp.weights + fsdp.grads + fsdp.master + fsdp.optimizer == pytest.approx(16 * n / 32)
    assert fsdp.gathered > 0 and ddp.gathered == 0
    fp32 = make_plan(cfg_on("410m", GPU, **{"cluster.sharding": "ddp", "recipe.precision": "fp32"}))
    assert (fp32.weights, fp32.grads, fp32.master, fp32.optimizer) == (4 * n, 4 * n, 0, 8 * n)
    assert fp32.activations == pytest.approx(2 * ddp.activations)


def test_activations_follow_korthikanti_and_checkpointing_keeps_block_inputs():
    p = make_plan(cfg_on("6b", GPU), checkpointing="off")
    m = resolve(preset="6b").model
    b = 256 / 32
    assert p.micro_batch == b
    # GPU: fused SDPA, no s x s scores: 34 s b h bytes per layer
    assert p.activations == pytest.approx(m.n_layer * 34 * m.seq_len * b * m.d_model)
    assert p.activations_ckpt == pytest.approx(m.n_layer * 2 * m.seq_len * b * m.d_model
                                               + 34 * m.seq_len * b * m.d_model)
    assert p.logits == pytest.approx(m.seq_len * b * m.vocab_size * 10)
    t = make_plan(cfg_on("6b", TPU), checkpointing="on")  # TPU counts the 5 a s / h attention scores
    per_layer = m.seq_len * 4 * m.d_model * (34 + 5 * m.n_head * m.seq_len / m.d_model)
    assert t.activations == pytest.approx(m.n_layer * per_layer)


def test_throughput_needed_for_the_papers_6b_run():
    """The paper's 6B: 75k steps x 256 x 2048 tokens in 72 h on TPU v4 (128 cores = 64 chips)."""
    p = make_plan(cfg_on("6b", TPU), days=3)
    assert p.tokens == 75000 * 256 * 2048
    assert p.tokens_per_s_needed == pytest.approx(p.tokens / (3 * 86400))
    assert p.checkpointing  # 100 GiB of activations per chip otherwise
    assert p.flops_per_token == 8 * p.params
    assert p.mfu_needed == pytest.approx(p.tokens_per_s_needed * 8 * p.params / (64 * 275e12))
    assert 0.3 < p.mfu_needed < 0.5  # what the paper's 72 h implies: plausible on v4
    assert p.days_at_mfu == pytest.approx(p.tokens / (64 * 275e12 * 0.4 / (8 * p.params)) / 86400)
    no_ckpt = make_plan(cfg_on("6b", GPU))
    assert not no_ckpt.checkpointing and no_ckpt.flops_per_token == 6 * no_ckpt.params


@pytest.mark.parametrize("preset", ["6b", "13b", "52b"])
def test_gpu_file_fits_the_papers_models(preset):
    p = make_plan(cfg_on(preset, GPU))
    assert p.fits and p.total_ckpt <= p.capacity == pytest.approx(80 * GiB * 0.9)


def test_52b_does_not_fit_one_v4_slice_and_is_refused(capsys):
    with pytest.raises(UserError, match=r"plan does not fit: 52b .* per TPU-V4"):
        make_plan(cfg_on("52b", TPU))
    code, out, err = run_cli(["--preset", "52b", "--cluster", TPU], capsys)
    assert code == 2 and out == "" and "does not fit" in err and "Traceback" not in err
    # two slices (128 chips) do
    assert make_plan(cfg_on("52b", TPU, **{"cluster.workers": 32})).fits


def test_ddp_of_a_big_model_is_refused_with_the_fsdp_hint():
    with pytest.raises(UserError, match="cluster.sharding=fsdp"):
        make_plan(cfg_on("13b", GPU, **{"cluster.sharding": "ddp"}))


def test_checkpointing_off_can_be_refused_where_auto_fits():
    cfg = cfg_on("13b", GPU)
    assert make_plan(cfg).checkpointing
    with pytest.raises(UserError, match="activation checkpointing"):
        make_plan(cfg, checkpointing="off")


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="not divisible"):
        make_plan(cfg_on("6b", GPU, **{"cluster.workers": 24}))
    with pytest.raises(UserError, match="at least one sequence"):
        make_plan(cfg_on("6b", TPU, **{"recipe.batch_size": 32}))  # 16 hosts divide it, 64 chips do not
    with pytest.raises(UserError, match="accelerator_type"):
        make_plan(cfg_on("6b", GPU, **{"cluster.accelerator_type": "K80"}))
    with pytest.raises(UserError, match="is a tpu but cluster.device is gpu"):
        make_plan(cfg_on("6b", GPU, **{"cluster.accelerator_type": "TPU-V4"}))
    with pytest.raises(UserError, match="multiple"):  # the backend's TPU topology check, before anything runs
        make_plan(cfg_on("6b", TPU, **{"cluster.workers": 12}))
    with pytest.raises(UserError, match="--mfu"):
        make_plan(cfg_on("6b", GPU), mfu=1.5)


def test_cli_text_and_json(capsys):
    code, out, _ = run_cli(["--preset", "6b", "--cluster", GPU, "--days", "5"], capsys)
    assert code == 0
    assert "32 x A100-80G" in out and "fsdp" in out and "tokens/s" in out and "fp32 master" in out
    assert "without checkpointing" in out and "with checkpointing" in out
    code, out, _ = run_cli(["--preset", "6b", "--cluster", GPU, "--json", "--mfu", "0.5"], capsys)
    row = json.loads(out)
    assert code == 0 and row["devices"] == 32 and row["days"] == 3 and row["mfu_assumed"] == 0.5
    assert row["tokens_per_s_needed"] == pytest.approx(row["tokens"] / (3 * 86400))
    code, _, err = run_cli(["--preset", "6b", "--cluster", GPU, "--accelerator", "H100", "--mfu", "0"], capsys)
    assert code == 2 and "--mfu" in err


def test_every_shipped_rayq_section_plans_the_6b(capsys):
    for path in sorted(CONFIGS.glob("*.rayq.yaml")):
        p = make_plan(with_values(resolve(preset="6b"), cluster_values(str(path))))
        assert p.fits, path.name
    assert set(ACCELERATORS) >= {"A100-80G", "H100", "TPU-V4", "TPU-V5E"}


def test_a_tpu_batch_that_does_not_split_over_the_chips_is_refused_before_workers_start(tmp_path):
    """SPMD on TPU hosts: each host splits its share of the batch over its chips. Checked when the
    trainer is built, before Ray starts a worker."""
    from rayq.cluster import backends
    from rayq.cluster.trainer import build_trainer

    good = cfg_on("6b", TPU)
    backends.check_run(good)
    bad = cfg_on("6b", TPU, **{"recipe.batch_size": good.cluster.workers * 6})  # hosts divide it, chips do not
    with pytest.raises(UserError, match=r"recipe.batch_size=\d+: not divisible by the \d+ TPU chips"):
        build_trainer(bad, storage=str(tmp_path))
    assert not any(tmp_path.iterdir())
