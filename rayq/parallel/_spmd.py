"""torch-xla SPMD (GSPMD) sharding: FSDP on TPU hosts, as sharding annotations on one program.

On TPUs rayq runs one process per host (the `spmd` layout of `rayq.cluster.xla`); the process
drives all of its chips and every host runs the same program over a global device mesh. The
`SPMD` strategy expresses FSDP the GSPMD way (the layout torch-xla's own
FSDPv2 uses), without wrapping modules, so parameter names and checkpoints stay rayq's:

* mesh: one axis, `fsdp`, over every device of every host.
* parameters: with `cluster.sharding: fsdp` each parameter is annotated as sharded on dim 0 over
  `fsdp` (XLA pads uneven splits); the compiler inserts the all-gathers before use and the
  reduce-scatters of the gradients. The fp32 parameters are the master weights; AdamW's state
  follows their sharding. With `ddp` they stay replicated (plain data parallelism).
* gradients are annotated with their parameter's sharding after backward, so the compiler keeps
  them sharded (a reduce-scatter, not an all-reduce); each block's backward is fenced by an
  optimization barrier (as FSDPv2 does) so the gradient syncs are not fused into one huge buffer.
* the batch is sharded on dim 0 over `fsdp`: every host loads its own slice of the global batch
  (`minibatch`, assembled into one global array) and the logits keep that sharding.
* precision is the recipe's `PrecisionPolicy`: on TPU bf16 autocast over fp32 master weights.
* checkpoints: `torch.distributed.checkpoint` with torch-xla's SPMD planners; every host writes
  the shards it owns, in the same `{"model", "optim"}` layout (parameter names as keys) as the
  FSDP2 path, so `rayq.checkpoint.load` reads them into full tensors without a device or
  process group (what `rayq eval` and the evaluator task do). Several hosts need a gloo process
  group for DCP's coordination: the xla backend starts one in the spmd layout.
* evaluation runs on every host (one program), on the sharded model; rank 0 reports.

Tested on XLA:CPU with 4 virtual devices (`CPU_NUM_DEVICES`) on one host (the xla lane): the loss
curve equals eager CPU's, resume from the sharded checkpoint is exact. Several hosts could not be
tested here (one PJRT CPU client is one host); on a multi-host slice prefer `eval.placement:
task`, which evaluates the committed checkpoints on the CPU head instead of inside the program.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from rayq import checkpoint as ckpt_io
from rayq.errors import UserError
from rayq.parallel._replicated import Replicated
from rayq.safe_dcp import SafeFileSystemReader

AXIS = "fsdp"


def is_active() -> bool:
    """Whether this process runs torch-xla in SPMD mode."""
    import torch_xla.runtime as xr

    return xr.is_spmd()


def enable() -> None:
    """Switch SPMD on (idempotent); before the first XLA tensor, or that tensor gets replicated."""
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()


def global_mesh() -> Any:
    """The 1-D `fsdp` mesh over every device of every host (set once as torch-xla's global mesh)."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    mesh = xs.get_global_mesh()
    if mesh is None:
        n = xr.global_runtime_device_count()
        mesh = xs.Mesh(np.arange(n), (n,), (AXIS,))
        xs.set_global_mesh(mesh)
    return mesh


def param_spec(param: torch.Tensor, fsdp: bool) -> tuple:
    """The partition spec of a parameter: dim 0 over `fsdp` (FSDP), or replicated."""
    spec: list = [None] * param.dim()
    if fsdp and spec:
        spec[0] = AXIS
    return tuple(spec)


class ShardedOutput(nn.Module):
    """The train-time module: the model, with its logits annotated as batch-sharded (so the
    compiler keeps activations split by batch rather than gathering them)."""

    def __init__(self, model: nn.Module, mesh: Any):
        super().__init__()
        self.model, self.mesh = model, mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        out = self.model(x)
        xs.mark_sharding(out, self.mesh, (AXIS,) + (None,) * (out.dim() - 1))
        return out


class SPMD(Replicated):
    """The strategy for torch-xla SPMD (see the module doc)."""

    def __init__(self, cfg, device, rank, world):
        super().__init__(cfg, device, rank, world)
        enable()
        import torch_xla.runtime as xr

        self.fsdp = cfg.cluster.sharding == "fsdp"
        self.mesh = global_mesh()
        self.local_devices = xr.addressable_runtime_device_count()
        self.hosts = xr.process_count()
        local_batch = cfg.recipe.batch_size // max(1, world)
        if local_batch % self.local_devices:
            raise UserError(f"recipe.batch_size={cfg.recipe.batch_size}: each of the {world} host(s) loads "
                            f"{local_batch} sequences, not divisible by its {self.local_devices} XLA devices")
        self.specs: dict[str, tuple] = {}
        # this host's slice of the global batch becomes the host's shards of one global array
        import torch_xla.distributed.spmd as xs

        self.batch_sharding = xs.ShardingSpec(self.mesh, (AXIS, None), minibatch=self.hosts > 1)

    def shard(self, model: nn.Module) -> nn.Module:
        import torch_xla.distributed.spmd as xs

        for name, p in model.named_parameters():
            self.specs[name] = param_spec(p, self.fsdp)
            xs.mark_sharding(p, self.mesh, self.specs[name])
        if self.fsdp:
            for block in model.blocks:
                xs.apply_backward_optimization_barrier(block)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return ShardedOutput(model, self.mesh)  # no DDP: the compiler does the data parallelism

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch_xla.core.xla_model as xm

        x, y = xm.send_cpu_data_to_device([x, y], self.device, input_sharding=self.batch_sharding)
        return x, y

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        for name, p in model.named_parameters():
            if p.grad is not None:  # keep gradients sharded like their parameters (reduce-scatter)
                xs.mark_sharding(p.grad, self.mesh, self.specs[name])
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def save(self, directory, model, optimizer, *, trainer_state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

        dcp.save(self._state(model, optimizer), storage_writer=dcp.FileSystemWriter(str(directory)),
                 planner=SPMDSavePlanner())
        if self.rank == 0:
            ckpt_io.write(directory, model_state=None, optim_state=None, trainer_state=trainer_state, cfg=self.cfg)

    def load(self, directory, model, optimizer) -> dict:
        d = Path(directory)
        if not ckpt_io.is_sharded(d):  # a full checkpoint (local or DDP run): copied into the shards
            return super().load(d, model, optimizer)
        import torch.distributed.checkpoint as dcp
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, prime_optimizer

        prime_optimizer(optimizer)  # DCP loads in place: the AdamW state must exist (and be sharded) first
        state = self._state(model, optimizer)
        dcp.load(state, storage_reader=SafeFileSystemReader(d), planner=SPMDLoadPlanner())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(ckpt_io.optim_fqns_to_ids(state["optim"]))
        return ckpt_io.load_trainer(d)

    @staticmethod
    def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return {"model": model.state_dict(),
                "optim": ckpt_io.optim_ids_to_fqns(optimizer.state_dict(), model, optimizer)}

    def eval_model(self, model: nn.Module) -> Optional[nn.Module]:
        return model  # every host runs the same program; the sharded model is evaluated in place


def describe(model: nn.Module) -> dict[str, str]:
    """Each parameter's XLA sharding, e.g. '{devices=[4,1]0,1,2,3}' (for tests and logs)."""
    import torch_xla

    return {n: torch_xla._XLAC._get_xla_sharding_spec(p) for n, p in model.named_parameters()}

