"""FSDP2 sharding and sharded (DCP) checkpoints, for models that do not fit one device.

`cluster.sharding: fsdp` with more than one worker makes the one train loop (`rayq.train.run`)
use the `FSDP` strategy: it shards the model with `torch.distributed.fsdp.fully_shard` instead
of wrapping it in DDP:
one FSDP unit per transformer block, one for `lm_head`, then the root (embeddings, final
LayerNorm). Parameters, gradients and AdamW state are sharded on dim 0 across the workers
(DTensors); the sharded fp32 parameters are the master weights the optimizer updates.

Precision: one design, rayq's `PrecisionPolicy` stays the single owner of the compute numerics.

* fp32 recipes: no `MixedPrecisionPolicy`; the run equals DDP up to reduction order.
* `native` half (bf16 everywhere; fp16 on GPU): `MixedPrecisionPolicy(param_dtype=half,
  reduce_dtype=fp32, cast_forward_inputs=False)` on the blocks and `lm_head`: parameters are
  all-gathered and used in half (half the all-gather bytes and unsharded-parameter memory),
  gradients are reduce-scattered in fp32 into fp32 sharded grads. The forward still runs under
  the policy's `torch.autocast`, so the op-level choices are those of a DDP run: the matmuls
  see the same half-rounded weights autocast would make, softmax/loss run in fp32, LayerNorm
  runs in fp32 when `layernorm_fp32`, and — because FSDP does not cast the block inputs and the
  root (embeddings, final LayerNorm) keeps fp32 parameters — the residual stream stays fp32
  exactly as under autocast. The one difference from DDP+autocast: the block LayerNorm gains
  and biases are rounded to the half dtype once (then upcast for the fp32 LayerNorm).
* `emulated` half (fp16 on CPU under `auto`): emulation rounds fp32 tensors at every matmul /
  LayerNorm boundary and needs fp32 operands, and native fp16 on CPU is ~50x slower, so FSDP
  all-gathers fp32 parameters (no `MixedPrecisionPolicy`) and the `EmulatedHalf` mode does the
  rounding exactly as in a DDP run. Numerics are the recipe's; communication volume is fp32's
  (emulation is a CPU stand-in for the numerics, not for the bandwidth).
* fp16 loss scaling uses `ShardedGradScaler`, whose inf/NaN check is all-reduced so every rank
  skips the same steps.

Checkpoints: every rank writes its shards of `{"model", "optim"}` with
`torch.distributed.checkpoint` (DCP: `__<rank>_0.distcp` files plus `.metadata` from rank 0)
into its staging directory; rank 0 adds `trainer.pt` and `config.yaml` (`rayq.checkpoint`'s
files), so `load_config` works on a sharded checkpoint. Locally all ranks share rank 0's staging
directory; on Ray each rank reports its own and Ray Train merges them into one. Resume loads
the shards back in place (any worker count: DCP reshards); `load_full_state_dict(dir)` reads a
full, unsharded model state dict without a process group (what `rayq eval` and the evaluator use
through `rayq.checkpoint.load_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from rayq import checkpoint as ckpt_io
from rayq.model import GPT
from rayq.parallel._replicated import Replicated
from rayq.precision import PrecisionPolicy
from rayq.safe_dcp import SafeFileSystemReader
from rayq.schema import Config


def mixed_precision(cfg: Config, device_type: str) -> Optional[MixedPrecisionPolicy]:
    """The FSDP `MixedPrecisionPolicy` of the recipe (None: parameters stay fp32; see module doc)."""
    policy = PrecisionPolicy.from_recipe(cfg.recipe, device_type)
    if policy.mode != "native":  # fp32, or emulated rounding (needs fp32 operands)
        return None
    return MixedPrecisionPolicy(param_dtype=policy.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


class FSDP(Replicated):
    """The strategy for FSDP2 on GPU and CPU workers (see the module doc).
    XLA devices never get here: `rayq.parallel.choose` sends them to `SPMD`."""

    def shard(self, model: nn.Module) -> nn.Module:
        """Apply `fully_shard` per transformer block, to `lm_head`, then the root; returns `model`
        (now an `FSDPModule` whose parameters are DTensor shards). Before the optimizer is built."""
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        half = mixed_precision(self.cfg, self.device.type)
        unit = {"mesh": mesh, "mp_policy": half} if half is not None else {"mesh": mesh}
        for block in model.blocks:
            fully_shard(block, **unit)
        fully_shard(model.lm_head, **unit)
        # root: embeddings and the final LayerNorm keep fp32 parameters (their outputs stay fp32, as under autocast)
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # an FSDPModule already communicates in forward/backward

    def make_scaler(self, policy: PrecisionPolicy):
        """fp16 loss scaler whose found-inf check is agreed across ranks (None when not fp16)."""
        return policy.make_scaler(ShardedGradScaler)

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm_` over DTensor grads: the norm of the whole (global) gradient, as a plain tensor."""
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # partial (per-shard) norms reduced across ranks
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
        return total

    def save(self, directory, model, optimizer, *, trainer_state: dict) -> None:
        """Collective: every rank writes its shards into `directory` (its own staging dir, or a
        shared one); rank 0 also writes trainer.pt and config.yaml."""
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(directory))
        if self.rank == 0:
            ckpt_io.write(directory, model_state=None, optim_state=None, trainer_state=trainer_state, cfg=self.cfg)

    def load(self, directory, model, optimizer) -> dict:
        """Collective: a sharded (DCP) checkpoint is read shard by shard (any saving world size); a
        full one (model.pt / optim.pt, from a DDP or local run) is sharded on load."""
        d = Path(directory)
        if ckpt_io.is_sharded(d):
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, storage_reader=SafeFileSystemReader(d))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optimizer, state["optim"])
            return ckpt_io.load_trainer(d)
        full = ckpt_io.load(d)
        full_opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, full["model"], options=full_opts)
        if full["optim"] is not None:
            set_optimizer_state_dict(model, optimizer, ckpt_io.optim_ids_to_fqns(full["optim"], model, optimizer),
                                     options=full_opts)
        return full["trainer"]

    def eval_model(self, model: nn.Module) -> Optional[nn.Module]:
        """Collective: an unsharded fp32 copy of `model` on rank 0 (None elsewhere) for the eval hook."""
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        device = next(iter(model.parameters())).device
        with torch.device("meta"):  # no init: it would draw from (and shift) rank 0's dropout RNG stream
            copy = GPT(self.cfg.model, dropout=self.cfg.recipe.dropout)
        copy.load_state_dict(state, assign=True)
        return copy.to(device).train(model.training)
