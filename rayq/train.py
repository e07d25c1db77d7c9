"""The one train loop: local runs, Ray Train workers, tests and benchmarks all call `run()`.

`run(cfg, reporter)` trains `cfg.recipe` on the prepared corpus: AdamW (weight decay on >=2-D
weights only), linear warmup + cosine decay, optional gradient clipping, the precision policy
(native autocast or emulated rounding; dynamic loss scaling for fp16), periodic held-out loss and
an optional eval hook (the INT8 evaluator), NaN/inf detection, atomic checkpoints and bit-exact
resume. How the model is spread over ranks and devices is a `rayq.parallel` strategy: one process,
DDP, FSDP2 with sharded checkpoints (`cluster.sharding: fsdp`), or torch-xla SPMD on TPU hosts —
the same loop; only the sharding, batch placement, clipping and checkpoint I/O differ.
Where the loop runs is the reporter's business: `LocalReporter` writes a run directory;
`rayq.cluster` supplies a reporter that forwards to `ray.train.report`. This module never
imports ray.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from rayq import batches as batches_io
from rayq import checkpoint as ckpt_io
from rayq import config as config_io
from rayq import data as data_io
from rayq import metrics as names
from rayq import parallel
from rayq import run_dir as run_files
from rayq.model import GPT, param_groups
from rayq.precision import PrecisionPolicy
from rayq.progress import human_duration, progress_line, say
from rayq.schema import Config, RecipeConfig

# An eval hook: (unwrapped model, step, policy) -> flat metrics, run on rank 0 at each eval step
# (`rayq.eval.make_eval_hook` builds the INT8 evaluator's; `rayq.cluster.evaluator` decides whether the loop gets one).
EvalHook = Callable[[nn.Module, int, PrecisionPolicy], dict]

# With fp16 loss scaling a non-finite loss is first a skipped step; this many in a row is divergence.
MAX_CONSECUTIVE_SKIPS = 20


class Reporter(Protocol):
    """Where metrics and checkpoints go, and where a resume comes from."""

    rank: int
    world_size: int

    def new_checkpoint_dir(self, step: int) -> Path: ...

    def report(self, metrics: dict, checkpoint: Optional[Path] = None) -> Optional[Path]:
        """Record metrics; commit the staged checkpoint dir (if any) and return where it now lives."""

    def restore(self) -> Optional[Path]: ...


class LocalReporter:
    """A run directory: config.yaml, metrics.jsonl (one line per report), checkpoints/step_N/.

    `echo`: one progress line per report on stderr (`step 120/900 · loss 4.21 · 5.3k tok/s ·
    eta 6m`); `verbose`: the full key=value report instead (metrics.jsonl has it either way)."""

    def __init__(self, run_dir: str | Path, cfg: Config, *, echo: bool = True, verbose: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.keep = cfg.train.keep_checkpoints
        self.echo = ProgressEcho.of(cfg, verbose=verbose) if echo else None
        self.checkpoints = self.run_dir / "checkpoints"
        if rank == 0:
            run_files.make_run_dir(self.run_dir)
            config_io.save(cfg, self.run_dir / "config.yaml")

    def _rank0_path(self, make: Callable[[], Optional[Path]]) -> Optional[Path]:
        """`make()` on rank 0, broadcast: all ranks of a multi-process local run agree on it."""
        if not parallel.process_group_up(self.world_size):
            return make()
        found = make() if self.rank == 0 else None
        box = [None if found is None else str(found)]
        dist.broadcast_object_list(box, src=0)
        return None if box[0] is None else Path(box[0])

    def new_checkpoint_dir(self, step: int) -> Path:
        # one staging dir for all ranks (a sharded checkpoint: every rank writes its shards there)
        return self._rank0_path(lambda: ckpt_io.staging_dir(self.checkpoints, f"step_{step}"))

    def report(self, metrics: dict, checkpoint: Optional[Path] = None) -> Optional[Path]:
        final = None
        if self.rank != 0:
            return None
        if checkpoint is not None:
            with ckpt_io.staged(checkpoint):
                final = ckpt_io.commit(checkpoint, self.checkpoints / f"step_{metrics[names.STEP]}")
            ckpt_io.prune(self.checkpoints, self.keep)
            metrics = {**metrics, names.CHECKPOINT_PATH: str(final)}
        append_metrics(self.run_dir, metrics)
        if self.echo is not None:
            self.echo(metrics)
        return final

    def _progress(self, m: dict) -> str:
        step, now = int(m[names.STEP]), time.monotonic()
        if self._clock is None:
            self._clock = (now, step)
        line = progress_line(step, self.total_steps, loss=m.get(names.TRAIN_LOSS), tokens_per_s=m.get(names.TOKENS_PER_S))
        t0, s0 = self._clock
        if step > s0 and step < self.total_steps:  # the pace since this process started (a resume counts from there)
            line += f" · eta {human_duration((now - t0) / (step - s0) * (self.total_steps - step))}"
        if names.EVAL_LOSS in m:
            line += f" · eval loss {m[names.EVAL_LOSS]:.4g}"
        if m.get(names.DIVERGED):
            line += " · diverged"
        return line

    def restore(self) -> Optional[Path]:
        # rank 0's view: another rank may get here before rank 0 has committed the last checkpoint;
        # a damaged newest checkpoint (a disk error, a half-copied run dir) falls back to an older one
        return self._rank0_path(lambda: ckpt_io.newest_valid(self.checkpoints, say=say))


METRICS_FILE = run_files.METRICS_FILE


def append_metrics(run_dir: str | Path, metrics: dict) -> None:
    """Append one report to `<run_dir>/metrics.jsonl`: the one writer of that file, for local runs
    and for the Ray driver of `rayq train --workers N` alike (`rayq.run_dir.append_metrics`:
    strict JSON, whole lines, no step twice after a resume)."""
    run_files.append_metrics(run_dir, metrics)


class ProgressEcho:
    """One stderr line per report: `step 120/900 · loss 4.21 · 5.3k tok/s · eta 6m` (the pace
    measured since this process's first report, so a resumed run's ETA is its own), or with
    `verbose` the full key=value report. Local runs and the Ray driver of `--workers N` use it."""

    def __init__(self, total_steps: int, *, tokens_per_step: int = 0, verbose: bool = False):
        self.total_steps, self.tokens_per_step, self.verbose = total_steps, tokens_per_step, verbose
        self._clock: Optional[tuple[float, int]] = None  # (time, step) of the first report

    @classmethod
    def of(cls, cfg: Config, *, verbose: bool = False) -> "ProgressEcho":
        return cls(cfg.recipe.steps, tokens_per_step=cfg.recipe.batch_size * cfg.model.seq_len, verbose=verbose)

    def __call__(self, metrics: dict) -> None:
        say(format_metrics(metrics) if self.verbose else self.line(metrics))

    def line(self, m: dict) -> str:
        step, now = int(m[names.STEP]), time.monotonic()
        if self._clock is None:
            self._clock = (now, step)
        loss = m.get(names.TRAIN_LOSS)
        line = progress_line(step, self.total_steps, loss=float("nan") if loss is None and m.get(names.DIVERGED) else loss,
                             tokens_per_s=m.get(names.TOKENS_PER_S))
        t0, s0 = self._clock
        left = self.total_steps - step
        tokens_per_s = m.get(names.TOKENS_PER_S)
        if left > 0 and s0 < step:  # wall-clock pace: eval and checkpoint time included
            line += f" · eta {human_duration((now - t0) / (step - s0) * left)}"
        elif left > 0 and self.tokens_per_step and isinstance(tokens_per_s, (int, float)) and tokens_per_s > 0:
            line += f" · eta {human_duration(left * self.tokens_per_step / tokens_per_s)}"  # first report
        if isinstance(m.get(names.EVAL_LOSS), (int, float)):
            line += f" · eval loss {m[names.EVAL_LOSS]:.4g}"
        if m.get(names.DIVERGED):
            line += " · diverged"
        return line


def format_metrics(m: dict) -> str:
    keys = [k for k in m if k != names.CHECKPOINT_PATH]
    parts = [f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys]
    return "  ".join(parts)


def lr_at(step: int, r: RecipeConfig) -> float:
    """Linear warmup to recipe.lr, then recipe.schedule down to lr * min_lr_ratio at recipe.steps:
    `cosine` over all steps after warmup, or `wsd` (warmup-stable-decay): flat at lr, then linear
    decay over the last decay_fraction of the steps."""
    if r.warmup_steps and step <= r.warmup_steps:
        return r.lr * step / r.warmup_steps
    floor = r.lr * r.min_lr_ratio
    if r.schedule == "wsd":
        decay_start = max(r.warmup_steps, r.steps - round(r.decay_fraction * r.steps))
        if step <= decay_start:
            return r.lr
        progress = min(1.0, (step - decay_start) / max(1, r.steps - decay_start))
        return r.lr - (r.lr - floor) * progress
    span = max(1, r.steps - r.warmup_steps)
    progress = min(1.0, (step - r.warmup_steps) / span)
    return floor + (r.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def was_clipped(grad_norm: float, max_clip: Optional[float]) -> bool:
    """Whether clipping scaled this step's gradients (a non-finite norm is a skipped step, not a clip)."""
    return max_clip is not None and math.isfinite(grad_norm) and grad_norm > max_clip


def data_metrics(data: data_io.PreparedData, step: int, cfg: Config) -> dict:
    """`data/tokens` (the train split's size) and `data/epochs` (passes over it so far): every
    window consumes seq_len corpus tokens, so repetition is in every report, never hidden."""
    tokens = data.num_tokens(data_io.TRAIN)
    seen = step * cfg.recipe.batch_size * cfg.model.seq_len
    return {names.data("tokens"): tokens, names.data("epochs"): seen / max(1, tokens)}


@dataclass
class RunResult:
    step: int
    diverged: bool
    last_metrics: dict
    checkpoint: Optional[Path]
    history: list[dict] = field(default_factory=list)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": _python_rng_tensor()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _python_rng_tensor() -> torch.Tensor:
    # weights_only loading forbids arbitrary objects: store Python's RNG state as a tensor
    version, internal, gauss = random.getstate()
    return torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    values = state["python"].tolist()
    random.setstate((values[0], tuple(values[1:-1]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def build_model(cfg: Config, device: torch.device) -> GPT:
    return GPT(cfg.model, dropout=cfg.recipe.dropout).to(device)


def build_optimizer(model: nn.Module, r: RecipeConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, r.weight_decay, r.decay_norm_gains), lr=r.lr, betas=(r.beta1, r.beta2), eps=r.eps,
                             foreach=True)


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], policy: PrecisionPolicy,
                 device: torch.device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with policy.autocast():
            logits = model(x)
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(1, count)


def run(cfg: Config, reporter: Reporter, *, data: Optional[data_io.PreparedData] = None,
        evaluator: Optional[EvalHook] = None, device: Optional[torch.device | str] = None,
        batches: Optional[Iterator] = None,
        stop_at: Optional[int] = None) -> RunResult:
    """Train `cfg` to `cfg.recipe.steps` (or `stop_at`), resuming from `reporter.restore()` if any.

    `data` is a `rayq.data.PreparedData` (prepared here when None); `batches` overrides the batch
    source (an iterator of (x, y) with state_dict/load_state_dict, e.g. a Ray Data shard).
    """
    device = ckpt_io.resolve_device(device if device is not None else cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    rank, world = reporter.rank, reporter.world_size
    if cfg.recipe.batch_size % world:
        raise ValueError(f"recipe.batch_size={cfg.recipe.batch_size} is not divisible by {world} workers")
    local_batch = cfg.recipe.batch_size // world

    torch.manual_seed(cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's
    random.seed(cfg.train.seed)
    strategy = parallel.choose(cfg, device, rank, world)
    model = strategy.shard(build_model(cfg, device))  # shards exist before the optimizer sees them
    optimizer = build_optimizer(model, cfg.recipe)
    policy = PrecisionPolicy.from_recipe(cfg.recipe, device.type)
    scaler = strategy.make_scaler(policy)
    if data is None:
        data = data_io.prepare(cfg.data, cfg.model.vocab_size)
    if batches is None:
        batches = batches_io.train_batches(data, batch_size=local_batch, seq_len=cfg.model.seq_len,
                                        seed=cfg.train.seed, rank=rank, world_size=world)
    heldout = batches_io.heldout_batches(data, cfg.train.eval_batches, cfg.eval.batch_size, cfg.model.seq_len)

    step, skipped, consecutive_skips = 0, 0, 0
    resume = reporter.restore()
    resumed_from = 0  # the step this process resumed from (0: a fresh start), reported with every log
    if resume is not None:
        t = strategy.load(resume, model, optimizer)
        step, skipped = int(t["step"]), int(t.get("skipped_steps", 0))
        resumed_from = step
        if scaler is not None and t.get("scaler"):
            scaler.load_state_dict(t["scaler"])
        batches.load_state_dict(t["data"])
        _set_rng_state(t["rng"][rank] if rank < len(t["rng"]) else t["rng"][0], device)
    else:
        torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank dropout streams

    train_model = strategy.wrap(model)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    train_model.train()
    last_step = min(cfg.recipe.steps, stop_at) if stop_at is not None else cfg.recipe.steps
    history: list[dict] = []
    last_metrics: dict = {}
    last_ckpt: Optional[Path] = resume
    window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
    window_steps, window_clipped = 0, 0
    grad_norm = float("nan")
    diverged = False

    def checkpoint_and_report(metrics: dict, with_checkpoint: bool) -> None:
        nonlocal last_ckpt, last_metrics
        staging = None
        if with_checkpoint:
            staging = reporter.new_checkpoint_dir(step)
            rng = _gather_rng(_rng_state(device), world)
            trainer_state = {"step": step, "skipped_steps": skipped, "rng": rng,
                             "scaler": scaler.state_dict() if scaler is not None else {},
                             "data": batches.state_dict()}
            with ckpt_io.staged(staging):  # a full disk: no half-written staging dir left behind
                strategy.save(staging, model, optimizer, trainer_state=trainer_state)  # collective
        final = reporter.report(metrics, checkpoint=staging)
        if staging is not None:
            last_ckpt = final
        last_metrics = metrics
        history.append(metrics)

    while step < last_step:
        t0 = time.perf_counter()
        x, y = strategy.to_device(*next(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step + 1, cfg.recipe)
        with policy.autocast():
            logits = train_model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # unscale before clipping so the norm is the true one
        else:
            loss.backward()
        max_norm = cfg.recipe.grad_clip if cfg.recipe.grad_clip is not None else float("inf")
        grad_norm_t = strategy.clip(model, max_norm)
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)  # skipped internally when grads hold inf/NaN
            scaler.update()
            step_skipped = scaler.get_scale() < scale_before
        else:
            # a non-finite loss ends the run below, before any checkpoint of this state
            optimizer.step()
            step_skipped = False
        optimizer.zero_grad(set_to_none=True)
        strategy.step_end()
        loss_value, grad_norm = loss.item(), float(grad_norm_t)
        step += 1
        skipped += int(step_skipped)
        consecutive_skips = consecutive_skips + 1 if step_skipped else 0
        window_time += time.perf_counter() - t0
        window_tokens += x.numel() * world
        window_steps += 1
        window_clipped += was_clipped(grad_norm, cfg.recipe.grad_clip)

        if not math.isfinite(loss_value) and (scaler is None or consecutive_skips >= MAX_CONSECUTIVE_SKIPS):
            diverged = True
            last_metrics = {names.STEP: step, names.TRAIN_LOSS: loss_value, names.DIVERGED: 1,
                            names.train("skipped_steps"): skipped}
            reporter.report(last_metrics)
            history.append({names.STEP: step, names.DIVERGED: 1})
            break
        if math.isfinite(loss_value):
            window_loss += loss_value
            window_n += 1

        is_eval = step == last_step or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
        is_ckpt = step == last_step or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
        if step % cfg.train.log_every == 0 or is_eval or is_ckpt:
            metrics = {names.STEP: step, names.TRAIN_LOSS: _global_mean(window_loss / max(1, window_n), world),
                       names.TOKENS_PER_S: window_tokens / max(window_time, 1e-9),
                       names.train("grad_norm"): grad_norm, names.train("lr"): lr_at(step, cfg.recipe),
                       names.train("loss_scale"): scaler.get_scale() if scaler is not None else 1.0,
                       names.train("skipped_steps"): skipped, names.train("resumed_from"): resumed_from,
                       names.train("clip_frac"): window_clipped / max(1, window_steps),
                       **data_metrics(data, step, cfg), names.DIVERGED: 0}
            window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
            window_steps, window_clipped = 0, 0
            if is_eval:
                metrics[names.EVAL_LOSS] = heldout_loss(model, heldout, policy, device)
                if evaluator is not None:
                    eval_model = strategy.eval_model(model)  # collective
                    if eval_model is not None:
                        metrics.update(evaluator(eval_model, step, policy))
            checkpoint_and_report(metrics, with_checkpoint=bool(is_ckpt))
    return RunResult(step=step, diverged=diverged, last_metrics=last_metrics, checkpoint=last_ckpt, history=history)


def _global_mean(value: float, world: int) -> float:
    """Mean over ranks, so a reported train loss is the global batch's, not rank 0's share."""
    if not parallel.process_group_up(world):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


def _gather_rng(state: dict, world: int) -> list[dict]:
    """Every rank's RNG state, so a resumed run continues each rank's dropout stream exactly."""
    if not parallel.process_group_up(world):
        return [state]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, state)
    return gathered
