"""rayq: search pre-training recipes that make LLMs robust to INT8 post-training quantization.

The core package (configs, model, precision policy, data, the one train loop, checkpoints) never
imports Ray. Rooms installed beside it: `rayq.kernels` (INT8 math), `rayq.eval` (judging a
checkpoint), `rayq.cluster` (where work runs: Ray Train), `rayq.search` (Ray Tune search).
"""

__version__ = "0.1.0"
