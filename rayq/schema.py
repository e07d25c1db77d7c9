"""The configuration surface of rayq: one frozen, typed dataclass per section.

Like torchtitan's JobConfig, every section lives in this one schema file so that `rayq validate`
can check a whole file (including the `eval`, `cluster` and `search` sections owned by the rooms
above the core) without importing those rooms: arrows point one way, kernels <- rayq <- eval <-
cluster <- search. The rooms read their section from here; the logic stays in the rooms.

Every field has a comment saying what it means. `__post_init__` checks ranges and raises
`ValueError("field: what was expected")`; `rayq.config` prefixes the section path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Precision = Literal["bf16", "fp16", "fp32"]
PrecisionMode = Literal["auto", "native", "emulated"]
Device = Literal["auto", "cpu", "cuda", "xla"]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """GPT-style decoder (paper §3.2): pre-LayerNorm, GeLU MLP, untied embeddings."""

    vocab_size: int = 4096  # SentencePiece vocabulary; the paper uses 51200
    seq_len: int = 128  # context length (learned positional embeddings)
    n_layer: int = 2  # transformer blocks
    d_model: int = 64  # residual width
    n_head: int = 4  # attention heads; must divide d_model
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    bias: bool = True  # biases in linears and LayerNorms
    init_std: float = 0.02  # normal init of weights; residual projections scaled by 1/sqrt(2*n_layer)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "d_model", "n_head", "mlp_ratio"):
            _check(getattr(self, name) >= 1, f"{name}: expected a positive integer, got {getattr(self, name)}")
        _check(self.d_model % self.n_head == 0, f"n_head: must divide d_model={self.d_model}, got {self.n_head}")
        _check(self.init_std > 0, f"init_std: expected > 0, got {self.init_std}")


@dataclass(frozen=True)
class RecipeConfig:
    """The optimization choices the paper found to nurture (or prevent) PTQ sensitivity."""

    weight_decay: float = 0.1  # AdamW decoupled weight decay, applied only to >=2-D weights
    grad_clip: Optional[float] = 1.0  # max global grad norm, or null for no clipping
    dropout: float = 0.0  # on attention and MLP outputs before the residual add; never on embeddings
    precision: Precision = "bf16"  # half dtype of the compute; master weights are always fp32
    precision_mode: PrecisionMode = "auto"  # native autocast, emulated rounding, or auto (emulated on CPU)
    layernorm_fp32: bool = True  # run LayerNorm in fp32 even under half precision
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup (paper: 1500)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    batch_size: int = 16  # global batch in sequences (paper: 256)
    steps: int = 200  # optimizer steps (paper: 75000)
    init_loss_scale: float = 65536.0  # fp16 dynamic loss scale start
    loss_scale_growth_interval: int = 2000  # steps without overflow before the scale doubles

    def __post_init__(self) -> None:
        _check(self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip: expected null or > 0, got {self.grad_clip}")
        _check(0 <= self.dropout < 1, f"dropout: expected in [0, 1), got {self.dropout}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"lr: expected a finite value > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2: expected in [0, 1)")
        _check(self.eps > 0, f"eps: expected > 0, got {self.eps}")
        _check(self.batch_size >= 1, f"batch_size: expected >= 1, got {self.batch_size}")
        _check(self.steps >= 1, f"steps: expected >= 1, got {self.steps}")
        _check(self.init_loss_scale > 0, f"init_loss_scale: expected > 0, got {self.init_loss_scale}")
        _check(self.loss_scale_growth_interval >= 1, "loss_scale_growth_interval: expected >= 1")


@dataclass(frozen=True)
class DataConfig:
    """Corpus -> SentencePiece -> Parquet token shards -> held-out split."""

    sources: list[str] = field(default_factory=list)  # txt/jsonl/parquet globs or s3:// gs:// URIs; [] = embedded corpus
    heldout_documents: list[str] = field(default_factory=lambda: ["austen/emma"])  # whole documents held out for eval
    heldout_fraction: float = 0.0  # additionally hold out this fraction of the other documents' tokens (0 = none)
    cache_dir: str = "~/.cache/rayq"  # where prepared data (tokenizer, shards) is cached by content hash
    tokenizer: Literal["unigram", "bpe"] = "unigram"  # SentencePiece model type; vocab from model.vocab_size
    tokenizer_train_chars: int = 8_000_000  # characters sampled to train the tokenizer
    shard_tokens: int = 1_000_000  # tokens per Parquet shard
    max_train_tokens: Optional[int] = None  # cap on training tokens (null = all)
    # How Ray Train workers read the train split. `tokens`: every worker reads the Parquet shards
    # with pyarrow and takes its rows of each global batch (exact: N workers x B == 1 worker x NB).
    # `ray-data`: `ray.data.read_parquet` + `get_dataset_shard`, each worker streams only its shard
    # (for corpora larger than a node's memory; batches then differ from a 1-worker run).
    loader: Literal["tokens", "ray-data"] = "tokens"

    def __post_init__(self) -> None:
        _check(0 <= self.heldout_fraction < 1, f"heldout_fraction: expected in [0, 1), got {self.heldout_fraction}")
        _check(self.tokenizer_train_chars >= 10_000, "tokenizer_train_chars: expected >= 10000")
        _check(self.shard_tokens >= 1024, f"shard_tokens: expected >= 1024, got {self.shard_tokens}")
        _check(self.max_train_tokens is None or self.max_train_tokens > 0, "max_train_tokens: expected null or > 0")


@dataclass(frozen=True)
class TrainConfig:
    """How the one train loop runs: seed, device, cadence of logs, evals and checkpoints."""

    seed: int = 0
    device: Device = "auto"  # auto = cuda if available else cpu (xla is chosen by the cluster backend)
    log_every: int = 10  # steps between train metric reports
    eval_every: int = 100  # steps between eval hooks (and checkpoints); 0 = only at the end
    checkpoint_every: int = 100  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept in the run directory (0 = all)
    eval_batches: int = 4  # held-out batches for the eval loss at each eval step
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch intra-op threads (0 = leave torch's default)

    def __post_init__(self) -> None:
        for name in ("log_every",):
            _check(getattr(self, name) >= 1, f"{name}: expected >= 1")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "threads"):
            _check(getattr(self, name) >= 0, f"{name}: expected >= 0, got {getattr(self, name)}")
        _check(self.eval_batches >= 1, f"eval_batches: expected >= 1, got {self.eval_batches}")


@dataclass(frozen=True)
class EvalConfig:
    """What is measured at each eval step and by `rayq eval` (owned by rayq.eval)."""

    tasks: list[str] = field(default_factory=lambda: ["heldout-lambada", "heldout-cloze"])  # task names (rayq ls tasks)
    task_paths: dict[str, str] = field(default_factory=dict)  # task name -> local file of the released format
    task_size: int = 200  # items per built-in task
    schemes: list[str] = field(default_factory=lambda: ["w8a8-vectorwise"])  # quantization schemes (rayq ls quant)
    kl_tokens: int = 16384  # held-out tokens for KL(FP||Q) and top-1 agreement
    batch_size: int = 16  # sequences per scoring batch
    bootstrap_samples: int = 1000  # paired bootstrap resamples for degradation CIs
    confidence: float = 0.95  # CI level
    diagnostics: bool = False  # also compute the paper's §5 diagnostics at each eval step
    placement: Literal["worker", "actor"] = "worker"  # evaluate on the train workers or a separate evaluator actor

    def __post_init__(self) -> None:
        _check(self.task_size >= 1, f"task_size: expected >= 1, got {self.task_size}")
        _check(self.kl_tokens >= 1, f"kl_tokens: expected >= 1, got {self.kl_tokens}")
        _check(self.batch_size >= 1, f"batch_size: expected >= 1, got {self.batch_size}")
        _check(self.bootstrap_samples >= 10, "bootstrap_samples: expected >= 10")
        _check(0.5 < self.confidence < 1, f"confidence: expected in (0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class ClusterConfig:
    """Where work runs (owned by rayq.cluster); maps to Ray Train's ScalingConfig/RunConfig."""

    device: Literal["cpu", "gpu", "tpu"] = "cpu"
    workers: int = 0  # Ray Train workers; 0 = run the loop in-process without Ray
    cpus_per_worker: float = 1.0  # fractional CPUs let several trials share a small machine
    gpus_per_worker: float = 0.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources
    evaluator_resources: dict[str, float] = field(default_factory=dict)  # for placement=actor
    storage: Optional[str] = None  # local path, s3:// or gs:// (null = next to --out)
    address: Optional[str] = None  # Ray address; null = embedded local Ray
    sharding: Literal["ddp", "fsdp"] = "ddp"
    topology: Optional[str] = None  # TPU slice topology, e.g. "4x4"
    accelerator_type: Optional[str] = None  # e.g. "TPU-V5E", "A100"
    max_failures: int = 1  # Ray Train restarts from the last checkpoint after a worker dies

    def __post_init__(self) -> None:
        _check(self.workers >= 0, f"workers: expected >= 0, got {self.workers}")
        _check(self.cpus_per_worker > 0, f"cpus_per_worker: expected > 0, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker >= 0, f"gpus_per_worker: expected >= 0, got {self.gpus_per_worker}")
        _check(self.max_failures >= -1, "max_failures: expected >= -1 (-1 = unlimited)")
        if self.device == "gpu":
            _check(self.gpus_per_worker > 0, "gpus_per_worker: expected > 0 when device is gpu")


@dataclass(frozen=True)
class SearchConfig:
    """The recipe search (owned by rayq.search)."""

    searcher: Literal["nsga2", "tpe", "gp", "grid", "random"] = "nsga2"
    num_samples: int = 4  # recipes proposed (grid: ignored, the grid decides)
    seeds_per_recipe: int = 1  # train each recipe with this many seeds; objectives are seed means
    space: dict[str, Any] = field(default_factory=dict)  # dotted recipe path -> {choice|uniform|loguniform|grid: ...}
    objectives: list[str] = field(default_factory=lambda: ["fp/acc:max", "ptq/w8a8-vectorwise/kl:min"])
    constraints: list[str] = field(default_factory=list)  # e.g. "ptq/w8a8-vectorwise/degradation_pct>=-1"
    # Early stopping. `dominance`: from the first milestone on, at every evaluation, stop a recipe
    # only when another recipe dominates it beyond noise with probability >= stop_confidence (no
    # quota). `moasha`: at each milestone keep the top 1/eta (asynchronous successive halving).
    rule: Literal["dominance", "moasha"] = "dominance"
    # P(j dominates i) needed to stop i: the compute/quality dial. 0.9 measured on 200 simulated
    # searches of the paper's grid: the knee kept in ~90% of searches with ~55% of the grid's compute.
    stop_confidence: float = 0.9
    # Between-seed sd of one seed's value per objective (and hard-limit metric), in the metric's
    # units: the noise the dominance rule judges against when a recipe has one seed
    # (seeds_per_recipe >= 2 measures it instead, pooled over recipes at each evaluation).
    noise_prior: dict[str, float] = field(default_factory=dict)
    milestones: list[int] = field(default_factory=lambda: [15000])  # dominance: the first is the grace period; moasha: rungs
    eta: float = 3.0  # moasha: keep the top 1/eta at each milestone
    max_concurrent: int = 2  # trials at once
    trial_cpus: float = 0.5  # CPUs for each trial's driver
    seed: int = 0  # searcher seed

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, f"num_samples: expected >= 1, got {self.num_samples}")
        _check(self.seeds_per_recipe >= 1, f"seeds_per_recipe: expected >= 1, got {self.seeds_per_recipe}")
        _check(self.eta > 1, f"eta: expected > 1, got {self.eta}")
        _check(0.5 <= self.stop_confidence < 1, f"stop_confidence: expected in [0.5, 1), got {self.stop_confidence}")
        _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                   for v in self.noise_prior.values()),
               "noise_prior: expected metric -> a finite sd > 0")
        _check(self.max_concurrent >= 1, f"max_concurrent: expected >= 1, got {self.max_concurrent}")
        _check(self.trial_cpus > 0, f"trial_cpus: expected > 0, got {self.trial_cpus}")
        _check(all(m >= 1 for m in self.milestones), "milestones: expected positive step numbers")
        _check(list(self.milestones) == sorted(set(self.milestones)), "milestones: expected strictly increasing steps")
        _check(len(self.objectives) >= 1, "objectives: expected at least one 'metric:max|min'")


@dataclass(frozen=True)
class Config:
    """A whole rayq config: what `resolve()` returns and what every run directory stores."""

    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    name: str = "run"  # a label for the run or search
