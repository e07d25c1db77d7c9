"""The strategies behind `rayq.parallel.Strategy`: siblings, chosen once per run."""

import torch

from rayq import config as config_io
from rayq import parallel


def test_one_process_is_replicated_and_every_strategy_has_the_loops_interface():
    cfg = config_io.resolve("tiny")
    cpu = torch.device("cpu")
    chosen = parallel.choose(cfg, cpu, 0, 1)
    assert type(chosen) is parallel.Replicated and isinstance(chosen, parallel.Strategy)
    # FSDP needs a process group to be chosen (one process: nothing to shard over)
    fsdp_cfg = config_io.with_values(cfg, {"cluster.sharding": "fsdp"})
    assert type(parallel.choose(fsdp_cfg, cpu, 0, 1)) is parallel.Replicated
    assert isinstance(parallel.FSDP(fsdp_cfg, cpu, 0, 2), parallel.Strategy)
    assert set(parallel.__all__) <= set(dir(parallel))
