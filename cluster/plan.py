"""`rayq plan`: will a full-scale run fit its cluster, and how fast must it go?

For a resolved config (preset + recipe + cluster file) this computes, per device:

* model state: half-precision compute weights and gradients (2 + 2 bytes/param), fp32 master
  weights (4) and AdamW's two fp32 moments (8), i.e. the 16 bytes/param of mixed-precision Adam
  (fp32 recipes: 4 + 4 + 8, no separate master copy). DDP replicates all of it on every device;
  FSDP (ZeRO-3) divides it by the device count and adds the transient unsharded weights of the
  layers being gathered (two blocks: the current one and the prefetched next one).
* activations for the recipe's micro-batch (global batch / data-parallel devices) and sequence
  length, from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", eq. 2): 34·s·b·h bytes per layer in 16-bit, plus 5·a·s²·b when attention scores are
  materialized (GPU SDPA uses fused flash/memory-efficient kernels and stores none; the XLA
  lowering on TPU is counted with them, conservatively); fp32 activations double it. The LM head
  adds the logits: half logits, their fp32 copy for the loss and its fp32 gradient (10 bytes per
  token and vocabulary entry). With full activation checkpointing only each block's input
  (2·s·b·h) is kept, plus one block's activations while it is recomputed.
* throughput: tokens = steps · batch · seq_len; training FLOPs = 6·N·tokens (8·N with
  recomputation); the tokens/s needed to finish in `--days`, the MFU that needs on the cluster's
  peak, and the days the run takes at an assumed MFU (`--mfu`).

A plan that cannot fit (even with checkpointing) is refused with a `UserError` (exit code 2)
that says what would make it fit.

Peaks are dense (no sparsity) bf16/fp16 tensor-core / MXU FLOP/s and per-device HBM, from the
vendors' spec sheets; fp32 is the non-tensor-core rate on GPUs (TF32 is not fp32) and an
estimate on TPUs (MXU fp32 as bf16 passes: peak / 3).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

from rayq.cluster.backends import check, tpu_hosts
from rayq.commands import add_config_args, config_from_args, make_parser, parse_args
from rayq.errors import UserError
from rayq.model import count_parameters
from rayq.schema import ClusterConfig, Config, ModelConfig

GiB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_half: float  # dense bf16/fp16 FLOP/s per device (GPU or TPU chip)
    peak_fp32: float  # fp32 FLOP/s per device
    hbm_gib: float  # memory per device
    kind: str  # gpu | tpu | cpu


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("A100-40G", 312e12, 19.5e12, 40, "gpu"),
        Accelerator("A100-80G", 312e12, 19.5e12, 80, "gpu"),
        Accelerator("H100", 989e12, 67e12, 80, "gpu"),  # SXM
        Accelerator("TPU-V4", 275e12, 275e12 / 3, 32, "tpu"),
        Accelerator("TPU-V5E", 197e12, 197e12 / 3, 16, "tpu"),
        Accelerator("TPU-V5P", 459e12, 459e12 / 3, 95, "tpu"),
        Accelerator("TPU-V6E", 918e12, 918e12 / 3, 32, "tpu"),
        # this project's CPU (2 Zen 4 cores, measured: bf16 mm ~0.37, fp32 ~0.13 TFLOP/s; 24 GiB RAM)
        Accelerator("CPU", 0.37e12, 0.13e12, 24, "cpu"),
    )
}
_ALIASES = {
    "A100": "A100-40G",  # Ray's generic A100 label: assume the smaller card
    "A100-40GB": "A100-40G", "A100-80GB": "A100-80G", "NVIDIA-A100-80GB": "A100-80G",
    "H100-80G": "H100", "H100-80GB": "H100", "NVIDIA-H100-80GB": "H100",
    "TPU-V5LITEPOD": "TPU-V5E", "TPU-V5-LITE": "TPU-V5E", "V5E": "TPU-V5E", "V4": "TPU-V4",
    "V5P": "TPU-V5P", "V6E": "TPU-V6E",
}


def accelerator_for(cluster: ClusterConfig, override: Optional[str] = None) -> Accelerator:
    name = override or cluster.accelerator_type
    if not name:
        if cluster.device == "cpu":
            return ACCELERATORS["CPU"]
        raise UserError(f"cluster.accelerator_type: needed by rayq plan for device {cluster.device} "
                        f"(one of {', '.join(ACCELERATORS)})")
    key = name.upper().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in ACCELERATORS:
        raise UserError(f"cluster.accelerator_type={name!r}: rayq plan knows {', '.join(ACCELERATORS)} "
                        f"(and aliases {', '.join(sorted(_ALIASES))}); pass --accelerator NAME")
    acc = ACCELERATORS[key]
    if acc.kind != cluster.device and not (cluster.device == "cpu" and override):
        raise UserError(f"cluster.accelerator_type={name!r} is a {acc.kind} but cluster.device is {cluster.device}")
    return acc


def device_count(cluster: ClusterConfig) -> int:
    """Accelerators the run trains on: GPUs of all workers, or TPU chips of all slices."""
    if cluster.device == "gpu":
        if cluster.gpus_per_worker < 1:
            raise UserError(f"cluster.gpus_per_worker={cluster.gpus_per_worker}: a full-scale run needs whole GPUs")
        return max(1, cluster.workers) * int(cluster.gpus_per_worker)
    if cluster.device == "tpu":
        check(cluster)
        chips = math.prod(int(x) for x in cluster.topology.lower().split("x"))
        per_worker = cluster.resources_per_worker.get("TPU")  # {TPU: 1}: one worker per chip
        if not per_worker:  # default: one worker per host, owning the host's chips
            per_worker = chips / tpu_hosts(cluster.topology, cluster.accelerator_type)
        return int(max(1, cluster.workers) * per_worker)
    return max(1, cluster.workers)


@dataclass
class Plan:
    preset: str
    accelerator: str
    devices: int
    sharding: str
    precision: str
    params: int
    batch_size: int
    seq_len: int
    micro_batch: float  # sequences per device per step
    steps: int
    # bytes per device
    weights: float  # compute copy (half) or fp32 weights
    grads: float
    master: float  # fp32 master weights (0 for fp32 recipes: the weights are the master)
    optimizer: float  # AdamW exp_avg + exp_avg_sq, fp32
    gathered: float  # FSDP: transient unsharded weights of the gathered blocks
    activations: float  # without checkpointing
    activations_ckpt: float  # with full activation checkpointing
    logits: float
    total: float
    total_ckpt: float
    capacity: float  # usable memory per device (HBM x headroom)
    checkpointing: bool  # what the plan chose
    fits: bool
    # throughput
    tokens: float
    days: float
    tokens_per_s_needed: float
    flops_per_token: float
    mfu_needed: float
    mfu_assumed: float
    tokens_per_s_at_mfu: float
    days_at_mfu: float

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def _parameters(model: ModelConfig) -> int:
    return count_parameters(model)


def _state_bytes(n: float, precision: str) -> tuple[float, float, float, float]:
    """(weights, grads, master, optimizer) bytes for n parameters."""
    if precision == "fp32":
        return 4 * n, 4 * n, 0.0, 8 * n
    return 2 * n, 2 * n, 4 * n, 8 * n


def make_plan(cfg: Config, *, days: float = 3.0, mfu: float = 0.4, checkpointing: str = "auto",
              headroom: float = 0.9, accelerator: Optional[str] = None) -> Plan:
    """The plan for `cfg` on `cfg.cluster`; raises UserError when it cannot fit."""
    if days <= 0:
        raise UserError(f"--days {days}: expected > 0")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: expected in (0, 1]")
    if not 0 < headroom <= 1:
        raise UserError(f"--headroom {headroom}: expected in (0, 1]")
    c, m, r = cfg.cluster, cfg.model, cfg.recipe
    acc = accelerator_for(c, accelerator)
    n_dev = device_count(c)
    workers = max(1, c.workers)
    if r.batch_size % workers:
        raise UserError(f"recipe.batch_size={r.batch_size} is not divisible by cluster.workers={workers}")
    if r.batch_size < n_dev:
        raise UserError(f"recipe.batch_size={r.batch_size} < {n_dev} devices: every data-parallel device needs "
                        "at least one sequence per step (raise the batch or use fewer devices)")
    n = float(_parameters(m))
    per_block = 12 * m.d_model**2 + 13 * m.d_model  # qkv, out, fc_in, fc_out (+ biases, LayerNorms)
    half = r.precision != "fp32"
    act_bytes = 1.0 if half else 2.0  # Korthikanti's counts are for 16-bit activations
    b = r.batch_size / n_dev
    s, h, a, L, V = m.seq_len, m.d_model, m.n_head, m.n_layer, m.vocab_size
    scores = 5 * a * s / h if acc.kind != "gpu" else 0.0  # GPU SDPA: fused attention, no s x s scores kept
    per_layer = s * b * h * (34 + scores) * act_bytes
    activations = L * per_layer
    activations_ckpt = L * 2 * s * b * h * act_bytes + per_layer
    logits = s * b * V * 10 if half else s * b * V * 12
    weights, grads, master, optimizer = _state_bytes(n, r.precision)
    gathered = 0.0
    if c.sharding == "fsdp":
        weights, grads, master, optimizer = (x / n_dev for x in (weights, grads, master, optimizer))
        gathered = 2 * per_block * (2 if half else 4) * (2 if n_dev > 1 else 0)  # 2 blocks, weights + grads
    state = weights + grads + master + optimizer + gathered
    total, total_ckpt = state + activations + logits, state + activations_ckpt + logits
    capacity = acc.hbm_gib * GiB * headroom
    if checkpointing == "on":
        use_ckpt = True
    elif checkpointing == "off":
        use_ckpt = False
    else:
        use_ckpt = total > capacity
    fits = (total_ckpt if use_ckpt else total) <= capacity

    tokens = float(r.steps) * r.batch_size * s
    flops_per_token = (8 if use_ckpt else 6) * n
    peak = acc.peak_half if half else acc.peak_fp32
    need_tps = tokens / (days * 86400)
    at_mfu = n_dev * peak * mfu / flops_per_token
    plan = Plan(preset=cfg.name, accelerator=acc.name, devices=n_dev, sharding=c.sharding, precision=r.precision,
                params=int(n), batch_size=r.batch_size, seq_len=s, micro_batch=b, steps=r.steps,
                weights=weights, grads=grads, master=master, optimizer=optimizer, gathered=gathered,
                activations=activations, activations_ckpt=activations_ckpt, logits=logits, total=total,
                total_ckpt=total_ckpt, capacity=capacity, checkpointing=use_ckpt, fits=fits, tokens=tokens,
                days=days, tokens_per_s_needed=need_tps, flops_per_token=flops_per_token,
                mfu_needed=need_tps * flops_per_token / (n_dev * peak), mfu_assumed=mfu,
                tokens_per_s_at_mfu=at_mfu, days_at_mfu=tokens / at_mfu / 86400)
    if not fits:
        raise UserError(_refusal(plan, checkpointing))
    return plan


def _refusal(p: Plan, checkpointing: str) -> str:
    need = p.total_ckpt if p.checkpointing else p.total
    hints = []
    state = p.weights + p.grads + p.master + p.optimizer
    if p.sharding == "ddp":
        hints.append(f"cluster.sharding=fsdp (model state {_gb(state)} -> {_gb(state / p.devices)} per device)")
    else:
        hints.append("more devices")
    if not p.checkpointing and checkpointing == "off":
        hints.append(f"activation checkpointing (total {_gb(p.total_ckpt)})")
    if p.micro_batch > 1:
        hints.append("a smaller per-device batch (more devices, or gradient accumulation)")
    return (f"plan does not fit: {p.preset} ({p.params / 1e9:.1f}B params, {p.precision}, {p.sharding}) needs "
            f"{_gb(need)} per {p.accelerator} but {_gb(p.capacity)} is usable "
            f"(state {_gb(state + p.gathered)}, activations "
            f"{_gb(p.activations_ckpt if p.checkpointing else p.activations)}, logits {_gb(p.logits)}); "
            f"try {', or '.join(hints)}")


def _gb(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def format_plan(p: Plan) -> str:
    state = p.weights + p.grads + p.master + p.optimizer
    lines = [
        f"{p.preset}: {p.params / 1e9:.2f}B params, {p.precision}, batch {p.batch_size} x seq {p.seq_len}, "
        f"{p.steps} steps",
        f"cluster: {p.devices} x {p.accelerator} ({_gb(p.capacity)} usable each), {p.sharding}, "
        f"micro-batch {p.micro_batch:g} seq/device",
        "memory per device:",
        f"  weights {_gb(p.weights)}  grads {_gb(p.grads)}  fp32 master {_gb(p.master)}  "
        f"AdamW moments {_gb(p.optimizer)}" + (f"  gathered blocks {_gb(p.gathered)}" if p.gathered else ""),
        f"  model state {_gb(state + p.gathered)}; logits {_gb(p.logits)}",
        f"  activations {_gb(p.activations)} without checkpointing -> total {_gb(p.total)}",
        f"  activations {_gb(p.activations_ckpt)} with checkpointing    -> total {_gb(p.total_ckpt)}",
        f"  plan: {'checkpointing' if p.checkpointing else 'no checkpointing'}, "
        f"{'fits' if p.fits else 'DOES NOT FIT'}",
        "throughput:",
        f"  {p.tokens / 1e9:.1f}B tokens in {p.days:g} days needs {p.tokens_per_s_needed:,.0f} tokens/s "
        f"({p.tokens_per_s_needed / p.devices:,.0f} per device), MFU {p.mfu_needed:.1%} "
        f"at {p.flops_per_token / p.params:.0f}·N FLOPs/token",
        f"  at MFU {p.mfu_assumed:.0%}: {p.tokens_per_s_at_mfu:,.0f} tokens/s -> {p.days_at_mfu:.1f} days",
    ]
    return "\n".join(lines)


def plan_command(argv: list[str]) -> int:
    parser = make_parser("rayq plan", "Memory per device and tokens/s a full-scale run needs on a cluster "
                                      "(model size, batch, sequence length, precision, sharding); refuses "
                                      "a plan that cannot fit (exit code 2).")
    add_config_args(parser)
    parser.add_argument("--days", type=float, default=3.0, help="target wall-clock days for recipe.steps (3)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (0.4)")
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="activation checkpointing: auto = only if needed to fit")
    parser.add_argument("--headroom", type=float, default=0.9, help="usable fraction of device memory (0.9)")
    parser.add_argument("--accelerator", help=f"override cluster.accelerator_type ({', '.join(ACCELERATORS)})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parse_args(parser, argv)
    cfg = config_from_args(args)
    p = make_plan(cfg, days=args.days, mfu=args.mfu, checkpointing=args.checkpointing, headroom=args.headroom,
                  accelerator=args.accelerator)
    print(json.dumps(p.to_dict()) if args.json else format_plan(p))
    return 0
