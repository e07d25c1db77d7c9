"""How the one train loop spreads a model over ranks and devices: one strategy per layout.

`rayq.train.run` asks `choose()` once and then only talks to the strategy, so the loop itself is
the same for every layout:

* `Replicated` — one process, or DDP over a torch.distributed process group (gloo / NCCL /
  torch-xla's `xla` group): full checkpoints written by rank 0.
* `rayq.sharding.FSDP` — FSDP2 (`fully_shard`) with DTensor shards and DCP checkpoints, for GPU
  and CPU workers with `cluster.sharding: fsdp`.
* `rayq.spmd.SPMD` — torch-xla SPMD (GSPMD) on XLA devices: one process per host drives all of
  its chips; parameters are annotated as sharded over a global device mesh (FSDP when
  `cluster.sharding: fsdp`, replicated otherwise) and the batch is split across devices.

Every method that says "collective" must be called by all ranks at the same point.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from rayq import checkpoint as ckpt_io
from rayq.precision import PrecisionPolicy
from rayq.schema import Config


def process_group_up(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


class Replicated:
    """Every rank holds the whole model (one process, or DDP); rank 0 writes full checkpoints."""

    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world

    def shard(self, model: nn.Module) -> nn.Module:
        """Before the optimizer is built: spread the parameters (nothing to do when replicated)."""
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """After a resume: the module the loop calls forward on."""
        if process_group_up(self.world):
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def make_scaler(self, policy: PrecisionPolicy):
        return policy.make_scaler()

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def step_end(self) -> None:
        """After the optimizer step, before any value is read back: on XLA, cut the lazy graph
        here, once per step."""
        if self.device.type == "xla":
            import torch_xla

            torch_xla.sync()

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients (max_norm may be inf); returns the global gradient norm."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def save(self, directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *,
             trainer_state: dict) -> None:
        """Collective: write the checkpoint into the staging `directory`."""
        if self.rank == 0:
            ckpt_io.write(directory, model_state=model.state_dict(), optim_state=optimizer.state_dict(),
                          trainer_state=trainer_state, cfg=self.cfg)

    def load(self, directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: restore model and optimizer from `directory`; returns the trainer state."""
        state = ckpt_io.load(Path(directory))
        model.load_state_dict(state["model"])
        if state["optim"] is not None:
            optimizer.load_state_dict(state["optim"])
        return state["trainer"]

    def eval_model(self, model: nn.Module) -> Optional[nn.Module]:
        """Collective: the model the evaluator scores on this rank (None: this rank does not evaluate)."""
        return model if self.rank == 0 else None


def choose(cfg: Config, device: torch.device, rank: int, world: int) -> Replicated:
    """The strategy of this run. Call before the model is built: SPMD must be switched on before
    the first XLA tensor exists."""
    if device.type == "xla":
        from rayq import spmd

        if cfg.cluster.sharding == "fsdp" or spmd.is_active():
            return spmd.SPMD(cfg, device, rank, world)
    if cfg.cluster.sharding == "fsdp" and process_group_up(world):
        from rayq.sharding import FSDP

        return FSDP(cfg, device, rank, world)
    return Replicated(cfg, device, rank, world)
