"""The `Replicated` strategy: one process, or DDP over a torch.distributed process group (gloo /
NCCL / torch-xla's `xla` group); full checkpoints written by rank 0."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from rayq import checkpoint as ckpt_io
from rayq.parallel._base import process_group_up
from rayq.precision import PrecisionPolicy
from rayq.schema import Config


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
            import torch_xla  # only on XLA hosts: torch-xla is not installed elsewhere

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
