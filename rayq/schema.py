"""The configuration surface of rayq: one frozen, typed dataclass per section.

Like torchtitan's JobConfig, every section lives in this one schema file so that `rayq validate`
can check a whole file (including the `eval`, `cluster` and `search` sections owned by the rooms
above the core) without importing those rooms: arrows point one way, kernels <- rayq <- eval <-
cluster <- search. The rooms read their section from here; the logic stays in the rooms.

Every field has a docstring under it (torchtitan's style) saying what it means; `field_doc`
reads them from this file's source, so `rayq validate --explain recipe.lr` prints them.
`__post_init__` checks ranges and raises `ValueError("field: what was expected")`;
`rayq.config` prefixes the section path.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Precision = Literal["bf16", "fp16", "fp32"]
PrecisionMode = Literal["auto", "native", "emulated"]
Device = Literal["auto", "cpu", "cuda", "xla"]


# Training state per parameter: fp32 weights, fp32 grads and AdamW's two fp32 moments.
TRAIN_BYTES_PER_PARAM = 16
# No cluster rayq targets holds more training state than this (the paper's 52B model needs
# ~0.8 TB); a larger model is a typo (`model.d_model=1e9`), refused before anything allocates.
MAX_TRAIN_STATE_BYTES = 2**50
SEED_LIMIT = 2**32  # numpy and Optuna seeds are uint32


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _bytes(n: float) -> str:
    for scale, unit in ((2**80, "YiB"), (2**70, "ZiB"), (2**60, "EiB"), (2**50, "PiB"), (2**40, "TiB"), (2**30, "GiB")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 2**20:.3g} MiB"


@dataclass(frozen=True)
class ModelConfig:
    """GPT-style decoder (paper §3.2): pre-LayerNorm, GeLU MLP, untied embeddings."""

    vocab_size: int = 4096
    """SentencePiece vocabulary; the paper uses 51200."""

    seq_len: int = 128
    """Context length (learned positional embeddings)."""

    n_layer: int = 2
    """Transformer blocks."""

    d_model: int = 64
    """Residual width."""

    n_head: int = 4
    """Attention heads; must divide d_model."""

    mlp_ratio: int = 4
    """MLP hidden width = mlp_ratio * d_model."""

    bias: bool = True
    """Biases in linears and LayerNorms."""

    init_std: float = 0.02
    """Normal init of weights; residual projections scaled by 1/sqrt(2*n_layer)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "d_model", "n_head", "mlp_ratio"):
            _check(getattr(self, name) >= 1, f"{name}: expected a positive integer, got {getattr(self, name)}")
        _check(self.d_model % self.n_head == 0, f"n_head: must divide d_model={self.d_model}, got {self.n_head}")
        _check(self.init_std > 0, f"init_std: expected > 0, got {self.init_std}")
        state = self.num_parameters * TRAIN_BYTES_PER_PARAM
        _check(state <= MAX_TRAIN_STATE_BYTES,
               f"d_model/n_layer/vocab_size: {self.num_parameters:.3g} parameters need {_bytes(state)} for weights, "
               f"grads and AdamW state ({TRAIN_BYTES_PER_PARAM} bytes/parameter); expected at most "
               f"{_bytes(MAX_TRAIN_STATE_BYTES)}")

    @property
    def num_parameters(self) -> int:
        """Parameters of `rayq.model.GPT` for this config, counted without building it."""
        d, hidden, b = self.d_model, self.mlp_ratio * self.d_model, int(self.bias)
        layer_norm = d * (1 + b)
        block = (2 * layer_norm + 3 * d * d + 3 * d * b + d * d + d * b  # LayerNorms, qkv, attention out
                 + d * hidden + hidden * b + hidden * d + d * b)  # MLP in and out
        return 2 * self.vocab_size * d + self.seq_len * d + self.n_layer * block + layer_norm


@dataclass(frozen=True)
class RecipeConfig:
    """The optimization choices the paper found to nurture (or prevent) PTQ sensitivity."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to >=2-D weights (and LayerNorm gains if decay_norm_gains)."""

    grad_clip: Optional[float] = 1.0
    """Max global grad norm, or null for no clipping."""

    decay_norm_gains: bool = False
    """Also decay the LayerNorm gains (toward 0); biases are never decayed."""

    dropout: float = 0.0
    """On attention and MLP outputs before the residual add; never on embeddings."""

    precision: Precision = "bf16"
    """Half dtype of the compute; master weights are always fp32."""

    precision_mode: PrecisionMode = "auto"
    """Native autocast, emulated rounding, or auto (emulated on CPU)."""

    layernorm_fp32: bool = True
    """Run LayerNorm in fp32 even under half precision."""

    lr: float = 3e-3
    """Peak learning rate."""

    min_lr_ratio: float = 0.1
    """The schedule ends at lr * min_lr_ratio (cosine and wsd alike)."""

    schedule: Literal["cosine", "wsd"] = "cosine"
    """After warmup: `cosine` decays to the floor over all remaining steps; `wsd` (warmup-stable-decay)
    holds lr until the last decay_fraction of the steps, then decays linearly to the floor."""

    decay_fraction: float = 0.2
    """Wsd only: the final fraction of recipe.steps spent decaying."""

    warmup_steps: int = 20
    """Linear warmup (paper: 1500)."""

    beta1: float = 0.9
    """AdamW first-moment decay."""

    beta2: float = 0.95
    """AdamW second-moment decay."""

    eps: float = 1e-8
    """AdamW denominator epsilon."""

    batch_size: int = 16
    """Global batch in sequences (paper: 256)."""

    steps: int = 200
    """Optimizer steps (paper: 75000)."""

    init_loss_scale: float = 65536.0
    """Fp16 dynamic loss scale start."""

    loss_scale_growth_interval: int = 2000
    """Steps without overflow before the scale doubles."""

    def __post_init__(self) -> None:
        _check(self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip: expected null or > 0, got {self.grad_clip}")
        _check(0 <= self.dropout < 1, f"dropout: expected in [0, 1), got {self.dropout}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"lr: expected a finite value > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        _check(0 < self.decay_fraction <= 1, f"decay_fraction: expected in (0, 1], got {self.decay_fraction}")
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

    sources: list[str] = field(default_factory=list)
    """Txt/jsonl/parquet globs or s3:// gs:// URIs; [] = the embedded corpus named by data.corpus."""

    corpus: Literal["default", "large"] = "default"
    """Embedded corpus when sources is []: `default` (KJV, World English Bible, Austen; ~3M tokens) or
    `large` (adds GCIDE, WordNet glosses, Debian Reference, Jargon File, FOLDOC, Devil's Dictionary
    and three public-domain SWORD commentaries from Debian packages; ~30M tokens at vocab 2048)."""

    bos: bool = False
    """Start every packed sequence (train windows, held-out and KL batches) with the tokenizer's BOS
    id; a window then holds seq_len - 1 corpus tokens."""

    heldout_documents: list[str] = field(default_factory=lambda: ["austen/emma"])
    """Whole documents held out for eval."""

    heldout_fraction: float = 0.0
    """Additionally hold out this fraction of the other documents' tokens (0 = none)."""

    cache_dir: str = "~/.cache/rayq"
    """Where prepared data (tokenizer, shards) is cached by content hash."""

    tokenizer: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece model type; vocab from model.vocab_size."""

    tokenizer_train_chars: int = 8_000_000
    """Characters sampled to train the tokenizer."""

    shard_tokens: int = 1_000_000
    """Tokens per Parquet shard."""

    max_train_tokens: Optional[int] = None
    """Cap on training tokens (null = all)."""

    loader: Literal["tokens", "ray-data"] = "tokens"
    """How Ray Train workers read the train split. `tokens`: every worker reads the Parquet shards
    with pyarrow and takes its rows of each global batch (exact: N workers x B == 1 worker x NB).
    `ray-data`: `ray.data.read_parquet` + `get_dataset_shard`, each worker streams only its shard
    (for corpora larger than a node's memory; batches then differ from a 1-worker run)."""

    def __post_init__(self) -> None:
        _check(not (self.sources and self.corpus != "default"),
               f"corpus: {self.corpus!r} names an embedded corpus, but data.sources is set; give one of the two")
        _check(0 <= self.heldout_fraction < 1, f"heldout_fraction: expected in [0, 1), got {self.heldout_fraction}")
        _check(self.tokenizer_train_chars >= 10_000, "tokenizer_train_chars: expected >= 10000")
        _check(self.shard_tokens >= 1024, f"shard_tokens: expected >= 1024, got {self.shard_tokens}")
        _check(self.max_train_tokens is None or self.max_train_tokens > 0, "max_train_tokens: expected null or > 0")


@dataclass(frozen=True)
class TrainConfig:
    """How the one train loop runs: seed, device, cadence of logs, evals and checkpoints."""

    seed: int = 0
    """Seed of initialization, data order and dropout; in [0, 2**32)."""

    device: Device = "auto"
    """Auto = cuda if available else cpu (xla is chosen by the cluster backend)."""

    log_every: int = 10
    """Steps between train metric reports."""

    eval_every: int = 100
    """Steps between eval hooks (and checkpoints); 0 = only at the end."""

    checkpoint_every: int = 100
    """Steps between checkpoints; 0 = only at the end."""

    keep_checkpoints: int = 2
    """Newest checkpoints kept in the run directory (0 = all)."""

    eval_batches: int = 4
    """Held-out batches for the eval loss at each eval step."""

    compile: bool = False
    """Torch.compile the model."""

    threads: int = 0
    """Torch intra-op threads (0 = leave torch's default)."""

    def __post_init__(self) -> None:
        for name in ("log_every",):
            _check(getattr(self, name) >= 1, f"{name}: expected >= 1")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "threads"):
            _check(getattr(self, name) >= 0, f"{name}: expected >= 0, got {getattr(self, name)}")
        _check(self.eval_batches >= 1, f"eval_batches: expected >= 1, got {self.eval_batches}")
        _check(0 <= self.seed < SEED_LIMIT, f"seed: expected in [0, 2**32), got {self.seed}")


@dataclass(frozen=True)
class EvalConfig:
    """What is measured at each eval step and by `rayq eval` (owned by rayq.eval)."""

    tasks: list[str] = field(default_factory=lambda: ["heldout-lambada", "heldout-cloze"])
    """Task names (rayq ls tasks)."""

    task_paths: dict[str, str] = field(default_factory=dict)
    """Task name -> local file of the released format."""

    task_size: int = 200
    """Items per built-in task."""

    schemes: list[str] = field(default_factory=lambda: ["w8a8-vectorwise"])
    """Quantization schemes (rayq ls quant)."""

    kl_tokens: int = 16384
    """Held-out tokens for KL(FP||Q) and top-1 agreement."""

    batch_size: int = 16
    """Sequences per scoring batch."""

    bootstrap_samples: int = 1000
    """Paired bootstrap resamples for degradation CIs."""

    confidence: float = 0.95
    """CI level."""

    diagnostics: bool = False
    """Also compute the paper's §5 diagnostics at each eval step."""

    placement: Literal["worker", "task"] = "worker"
    """Evaluate in the train loop (`worker`), or in a Ray task per checkpoint (`task`)."""

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
    """Accelerator of the Ray Train workers."""

    workers: int = 0
    """Ray Train workers; 0 = run the loop in-process without Ray."""

    cpus_per_worker: float = 1.0
    """Fractional CPUs let several trials share a small machine."""

    gpus_per_worker: float = 0.0
    """GPUs per Ray Train worker (> 0 when device is gpu)."""

    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra custom resources."""

    evaluator_resources: dict[str, float] = field(default_factory=dict)
    """For placement=actor."""

    storage: Optional[str] = None
    """Local path, s3:// or gs:// (null = next to --out)."""

    address: Optional[str] = None
    """Ray address; null = embedded local Ray."""

    sharding: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism: replicated (ddp) or fully sharded (fsdp) weights and optimizer state."""

    topology: Optional[str] = None
    """TPU slice topology, e.g. "4x4"."""

    accelerator_type: Optional[str] = None
    """E.g. "TPU-V5E", "A100"."""

    max_failures: int = 1
    """Ray Train restarts from the last checkpoint after a worker dies."""

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
    """Optuna sampler proposing recipes (grid: every point of the space)."""

    num_samples: int = 4
    """Recipes proposed (grid: ignored, the grid decides)."""

    seeds_per_recipe: int = 1
    """Train each recipe with this many seeds; objectives are seed means."""

    space: dict[str, Any] = field(default_factory=dict)
    """Dotted recipe path -> {choice|uniform|loguniform|grid: ...}."""

    objectives: list[str] = field(default_factory=lambda: ["fp/acc:max", "ptq/w8a8-vectorwise/kl:min"])
    """Metrics to optimize, each 'metric:max' or 'metric:min' (seed means)."""

    constraints: list[str] = field(default_factory=list)
    """Hard limits, e.g. "ptq/w8a8-vectorwise/degradation_pct>=-1"."""

    rule: Literal["dominance", "moasha"] = "dominance"
    """Early stopping. `dominance`: from the first milestone on, at every evaluation, stop a recipe
    only when another recipe dominates it beyond noise with probability >= stop_confidence (no
    quota). `moasha`: at each milestone keep the top 1/eta (asynchronous successive halving)."""

    stop_confidence: float = 0.9
    """P(j dominates i) needed to stop i: the compute/quality dial. 0.9 measured on 200 simulated
    searches of the paper's grid: the knee kept in ~90% of searches with ~55% of the grid's compute."""

    noise_prior: dict[str, float] = field(default_factory=dict)
    """Between-seed sd of one seed's value per objective (and hard-limit metric), in the metric's
    units: the noise the dominance rule judges against when a recipe has one seed
    (seeds_per_recipe >= 2 measures it instead, pooled over recipes at each evaluation)."""

    sync_rungs: bool = False
    """dominance only: hold (Tune PAUSE) every trial at each milestone until all the search's
    trials have arrived there or ended, then judge them together, so arrival order does not decide
    who passes (meant for fixed grids; a held trial frees its slot, so waiting costs wall-clock
    time, not compute). Measured offline on the paper grid: see search/benchmarks/sync-rungs-*.json."""

    milestones: list[int] = field(default_factory=lambda: [15000])
    """Steps where recipes are compared (dominance: the first is the grace period; moasha: rungs);
    each a multiple of train.eval_every."""

    eta: float = 3.0
    """moasha: keep the top 1/eta at each milestone."""

    max_concurrent: int = 2
    """Trials at once."""

    trial_cpus: float = 0.5
    """CPUs for each trial's driver."""

    seed: int = 0
    """Searcher seed."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, f"num_samples: expected >= 1, got {self.num_samples}")
        _check(self.seeds_per_recipe >= 1, f"seeds_per_recipe: expected >= 1, got {self.seeds_per_recipe}")
        _check(self.eta > 1, f"eta: expected > 1, got {self.eta}")
        _check(not self.sync_rungs or self.rule == "dominance",
               f"sync_rungs: expected rule dominance, got rule {self.rule} (moasha judges asynchronously)")
        _check(0.5 <= self.stop_confidence < 1, f"stop_confidence: expected in [0.5, 1), got {self.stop_confidence}")
        _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                   for v in self.noise_prior.values()),
               "noise_prior: expected metric -> a finite sd > 0")
        _check(self.max_concurrent >= 1, f"max_concurrent: expected >= 1, got {self.max_concurrent}")
        _check(self.trial_cpus > 0, f"trial_cpus: expected > 0, got {self.trial_cpus}")
        _check(all(m >= 1 for m in self.milestones), "milestones: expected positive step numbers")
        _check(list(self.milestones) == sorted(set(self.milestones)), "milestones: expected strictly increasing steps")
        _check(len(self.objectives) >= 1, "objectives: expected at least one 'metric:max|min'")
        _check(0 <= self.seed < SEED_LIMIT, f"seed: expected in [0, 2**32), got {self.seed}")


@dataclass(frozen=True)
class Config:
    """A whole rayq config: what `resolve()` returns and what every run directory stores."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The GPT-style decoder."""

    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """The optimization choices under study."""

    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and splits."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """How the train loop runs."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """What is measured at eval steps and by rayq eval."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where work runs."""

    search: SearchConfig = field(default_factory=SearchConfig)
    """The recipe search."""

    name: str = "run"
    """A label for the run or search."""


# ----------------------------------------------------------------------------- field docs


@functools.lru_cache(maxsize=None)
def _docs_of(cls: type) -> dict[str, str]:
    """Field name -> the docstring literal under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


@dataclass(frozen=True)
class FieldInfo:
    key: str
    type: Any
    default: Any
    doc: str


def field_info(key: str, root: type | None = None) -> FieldInfo:
    """Type, default and doc of a dotted config key (`recipe.weight_decay`); KeyError if unknown."""
    import typing

    cls: Any = root or Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise KeyError(key)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise KeyError(key)
        f = fields[part]
        tp = typing.get_type_hints(cls, sys.modules[cls.__module__].__dict__)[part]
        if i == len(parts) - 1:
            default: Any = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            return FieldInfo(key, tp, default, _docs_of(cls).get(part, ""))
        cls = tp
    raise KeyError(key)
