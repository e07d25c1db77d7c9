"""The `Strategy` interface: what the one train loop asks of a parallel layout."""

from __future__ import annotations

import os
from typing import Optional, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn as nn

from rayq.precision import PrecisionPolicy


def process_group_up(world: int) -> bool:
    """Whether this run has a live torch.distributed process group to talk to."""
    return world > 1 and dist.is_available() and dist.is_initialized()


@runtime_checkable
class Strategy(Protocol):
    """How the model is spread over ranks and devices. `rayq.train.run` calls these, in this
    order, and nothing else; methods marked "collective" are called by all ranks at the same point."""

    rank: int
    world: int

    def shard(self, model: nn.Module) -> nn.Module:
        """Before the optimizer is built: spread the parameters over the ranks/devices."""

    def make_scaler(self, policy: PrecisionPolicy):
        """The fp16 loss scaler of this layout (None when the recipe needs none)."""

    def load(self, directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: restore model and optimizer from a checkpoint; returns its trainer state."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """After a resume: the module the loop calls forward on."""

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch placed where this rank's forward reads it."""

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients (max_norm may be inf); returns the global gradient norm."""

    def step_end(self) -> None:
        """After the optimizer step, before any value is read back."""

    def save(self, directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *,
             trainer_state: dict) -> None:
        """Collective: write a checkpoint into the staging `directory`."""

    def eval_model(self, model: nn.Module) -> Optional[nn.Module]:
        """Collective: the model the evaluator scores on this rank (None: this rank does not evaluate)."""
