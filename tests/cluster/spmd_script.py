"""Runs the one train loop under torch-xla SPMD on XLA:CPU virtual devices, in its own process.

SPMD and the device count are fixed when torch-xla's PJRT client starts, so the xla lane runs
this script in a fresh process (`CPU_NUM_DEVICES=N`) and compares what it writes against eager
CPU runs made in the test process. Usage: spmd_script.py OUT_JSON WORK_DIR [--set key=value ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: corpus_fixture


def main(out_json: str, work: str, overrides: list[str]) -> None:
    from corpus_fixture import tiny_config

    from rayq import data as data_io
    from rayq import parallel
    from rayq.eval import make_eval_hook
    from rayq.train import LocalReporter, run

    work_dir = Path(work)
    cfg = tiny_config(work_dir / "text", work_dir / "cache", *overrides)
    data = data_io.prepare(cfg.data, cfg.model.vocab_size)
    parallel.enable_spmd()  # before the first XLA tensor
    import torch_xla
    import torch_xla.runtime as xr

    device = torch_xla.device()
    full = run(cfg, LocalReporter(work_dir / "full", cfg, echo=False), data=data, device=device,
               evaluator=make_eval_hook(cfg, data))
    first = run(cfg, LocalReporter(work_dir / "resumed", cfg, echo=False), data=data, device=device, stop_at=3)
    second = run(cfg, LocalReporter(work_dir / "resumed", cfg, echo=False), data=data, device=device)
    from rayq.model import GPT

    probe = GPT(cfg.model).to(device)
    strategy = parallel.SPMD(cfg, device, 0, 1)
    strategy.shard(probe)
    result = {"devices": xr.global_runtime_device_count(), "spmd": xr.is_spmd(),
              "full": full.history, "full_checkpoint": str(full.checkpoint),
              "first_step": first.step, "resumed": second.history, "resumed_checkpoint": str(second.checkpoint),
              "shardings": parallel.describe_spmd(probe)}
    Path(out_json).write_text(json.dumps(result, default=float))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], [v for flag, v in zip(args[2::2], args[3::2]) if flag == "--set"])
