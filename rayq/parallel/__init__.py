"""How the one train loop spreads a model over ranks and devices: one `Strategy` per layout.

`rayq.train.run` asks `choose()` once and then only talks to the strategy, so the loop itself is
the same for every layout. The strategies are siblings behind the small `Strategy` interface:

* `Replicated` — one process, or DDP over a torch.distributed process group (gloo / NCCL /
  torch-xla's `xla` group): full checkpoints written by rank 0.
* `FSDP` — FSDP2 (`fully_shard`) with DTensor shards and DCP checkpoints, for GPU and CPU
  workers with `cluster.sharding: fsdp`.
* `SPMD` — torch-xla SPMD (GSPMD) on XLA devices: one process per host drives all of its chips;
  parameters are annotated as sharded over a global device mesh (FSDP when
  `cluster.sharding: fsdp`, replicated otherwise) and the batch is split across devices.

Checkpoint files, full or sharded, are `rayq.checkpoint`'s business; the strategies only decide
who writes which part.
"""

from __future__ import annotations

import torch

from rayq.parallel._base import Strategy, process_group_up
from rayq.parallel._fsdp import FSDP, mixed_precision
from rayq.parallel._replicated import Replicated
from rayq.parallel._spmd import SPMD
from rayq.parallel._spmd import describe as describe_spmd
from rayq.parallel._spmd import enable as enable_spmd
from rayq.parallel._spmd import is_active as spmd_active
from rayq.schema import Config

__all__ = [
    "FSDP",
    "SPMD",
    "Replicated",
    "Strategy",
    "choose",
    "describe_spmd",
    "enable_spmd",
    "mixed_precision",
    "process_group_up",
    "spmd_active",
]


def choose(cfg: Config, device: torch.device, rank: int, world: int) -> Strategy:
    """The strategy of this run. Call before the model is built: SPMD must be switched on before
    the first XLA tensor exists."""
    if device.type == "xla" and (cfg.cluster.sharding == "fsdp" or spmd_active()):
        return SPMD(cfg, device, rank, world)
    if cfg.cluster.sharding == "fsdp" and process_group_up(world):
        return FSDP(cfg, device, rank, world)
    return Replicated(cfg, device, rank, world)
