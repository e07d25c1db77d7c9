"""`evaluate(model, tasks, cfg.eval)`: FP scores, per-scheme scores, degradation with CI, KL.

The FP model is never modified: each scheme quantizes a deep copy (`rayq.kernels.quantize_`), one
scheme at a time so that only one quantized copy is alive. Tasks are tokenized once and the same
token requests are scored by every model, so FP and Q see identical items (the bootstrap pairs
them). `make_eval_hook(cfg, data)` wraps this for the train loop's eval steps.

Metric names come from `rayq.metrics`: `fp/<task>/<m>` for each metric a task reports
(multiple-choice tasks: `acc`, `acc_norm`, `acc_bytes`; LAMBADA-style: `acc`, `ppl`; perplexity
tasks: `bpb`, `ppl`), `fp/<m>` the mean of m over the tasks that report it, the same under
`q/<scheme>/`, `ptq/<scheme>/degradation_pct` (+ `_ci_low`, `_ci_high`; over each task's primary
metric), `ptq/<scheme>/kl` (+ `_se`), `ptq/<scheme>/top1_agree` (+ `_se`), `diag/...`.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from rayq import metrics as metric_names
from rayq.batches import with_bos
from rayq.errors import UserError
from rayq.eval.degradation import Interval, KLStats, kl_agreement, paired_bootstrap, token_batches
from rayq.eval.diagnostics import Diagnostics, analyze
from rayq.eval.scoring import Progress, TaskScores, as_tokenizer, encode_task, model_max_len, score_task
from rayq.eval.tasks import PERPLEXITY, LastWord, MultipleChoice, Task, get_spec, load_tasks
from rayq.kernels import quantize_, scheme_from_name
from rayq.kernels.schemes import SchemeError, scheme_class
from rayq.model import BLOCK_LINEARS
from rayq.schema import Config, EvalConfig
from rayq.train import EvalHook

Quantizer = Callable[[nn.Module, str], nn.Module]  # (FP model, scheme name) -> a quantized copy


# ============================================================================ quantization


def check_config(cfg: Config) -> None:
    """What `rayq validate` checks of the eval section: schemes through the kernels registry, task
    names through the task registry (both fail as one-line user errors)."""
    check_schemes(list(cfg.eval.schemes))
    for name in cfg.eval.tasks:
        get_spec(name)


def check_schemes(names: Sequence[str]) -> None:
    """Fail before any scoring on an unknown scheme, naming the closest one (the kernels' registry
    check, as a user error)."""
    for name in names:
        try:
            scheme_class(name)
        except SchemeError as exc:
            raise UserError(str(exc)) from None


def default_quantizer(calibration: Optional[Sequence[torch.Tensor]] = None, backend: str = "auto") -> Quantizer:
    """Quantize a deep copy of the model's block linears with `rayq.kernels.quantize_`.

    `calibration` (held-out token batches) is used by the schemes that need activation statistics
    (SmoothQuant, static per-tensor); the others ignore it. `backend` is the kernels' choice of
    GEMM path (auto | eager | compiled | reference).
    """
    def quantize(model: nn.Module, scheme: str) -> nn.Module:
        q = quantize_(model, scheme_from_name(scheme), layers=BLOCK_LINEARS, inplace=False, backend=backend,
                      calibration=list(calibration) if calibration is not None else None)
        return q.eval()

    return quantize


# ============================================================================ results


@dataclass
class SchemeResult:
    scheme: str
    tasks: dict[str, TaskScores]
    degradation: Optional[Interval]  # None when no accuracy task has a nonzero FP score
    degradation_tasks: list[str]  # tasks the degradation averages over
    kl: Optional[KLStats]  # None when no held-out tokens were given
    seconds: float = 0.0


@dataclass
class EvalResult:
    fp: dict[str, TaskScores]
    schemes: dict[str, SchemeResult]
    confidence: float
    diagnostics: Optional[Diagnostics] = None
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @staticmethod
    def _task_metrics(name_of: Callable[[Optional[str], str], str], scores: Mapping[str, TaskScores]) -> dict:
        """Each task's metrics under their own names (an `acc_norm` stays `acc_norm`), plus the
        mean of each of `metrics.MEAN_METRICS` over the tasks that report it. The means are always
        present (NaN when no task reports one): the search's objectives need every key in every report."""
        out: dict[str, float] = {}
        for task, s in scores.items():
            for m, value in s.metrics.items():
                if m in metric_names.TASK_METRICS:
                    out[name_of(task, m)] = value
        for m in metric_names.MEAN_METRICS:
            values = [s.metrics[m] for s in scores.values() if m in s.metrics]
            out[name_of(None, m)] = float(np.mean(values)) if values else float("nan")
        return out

    def metrics(self) -> dict[str, float]:
        """Flat metrics under `rayq.metrics` names; every value a float (NaN where undefined)."""
        out = self._task_metrics(metric_names.fp, self.fp)
        nan = float("nan")
        for name, r in self.schemes.items():
            out.update(self._task_metrics(functools.partial(metric_names.q, name), r.tasks))
            ptq = functools.partial(metric_names.ptq, name)
            if any(s.kind != PERPLEXITY for s in r.tasks.values()):
                d = r.degradation
                out[ptq("degradation_pct")] = d.estimate if d else nan
                out[ptq("degradation_pct_ci_low")] = d.low if d else nan
                out[ptq("degradation_pct_ci_high")] = d.high if d else nan
            k = r.kl  # NaN without held-out tokens, so the keys are there for the search either way
            out[ptq("kl")] = k.kl if k else nan
            out[ptq("kl_se")] = k.kl_se if k else nan
            out[ptq("top1_agree")] = k.top1_agree if k else nan
            out[ptq("top1_agree_se")] = k.top1_agree_se if k else nan
        if self.diagnostics is not None:
            out.update(self.diagnostics.summary())
        return {k: float(v) for k, v in out.items()}

    def to_dict(self) -> dict:
        """Everything, JSON-ready (the `rayq eval --json` document)."""
        def interval(d):
            return None if d is None else {"estimate": d.estimate, "ci_low": d.low, "ci_high": d.high, "se": d.se,
                                           "bootstrap_samples": d.samples}

        return {
            "confidence": self.confidence,
            "seconds": self.seconds,
            "meta": self.meta,
            "fp": {n: s.to_dict() for n, s in self.fp.items()},
            "schemes": {
                name: {"tasks": {n: s.to_dict() for n, s in r.tasks.items()},
                       "degradation_pct": interval(r.degradation),
                       "degradation_tasks": r.degradation_tasks,
                       "kl": None if r.kl is None else vars(r.kl),
                       "seconds": r.seconds}
                for name, r in self.schemes.items()
            },
            "metrics": self.metrics(),
            "diagnostics": None if self.diagnostics is None else self.diagnostics.summary(),
        }


# ============================================================================ evaluate


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def evaluate(model: nn.Module, tasks: Sequence[Task], eval_cfg: EvalConfig, *, tokenizer: Any = None,
             kl_batches: Optional[Sequence[torch.Tensor]] = None, policy: Any = None, seed: int = 0,
             quantizer: Optional[Quantizer] = None, diagnostic_batches: Optional[Sequence[torch.Tensor]] = None,
             progress: Progress = None, encoded: Optional[dict] = None) -> EvalResult:
    """Score `model` (FP) and a quantized copy per scheme of `eval_cfg` on `tasks`; see the module docstring.

    `eval_cfg` gives the schemes, scoring batch size, bootstrap size, confidence and whether to
    run the diagnostics (its `tasks` were already turned into `tasks` by `eval_inputs`).
    `kl_batches`: held-out token tensors (B, T) for KL(FP || Q) and top-1 agreement.
    `quantizer`: (model, scheme) -> quantized copy; defaults to rayq.kernels on a deep copy.
    `encoded`: a dict to cache the tasks' token requests in across calls (the train-loop hook).
    """
    schemes, batch_size = eval_cfg.schemes, eval_cfg.batch_size
    t0 = time.perf_counter()
    if tasks and tokenizer is None:
        raise ValueError("evaluate: a tokenizer is needed to score tasks")
    if quantizer is None:
        check_schemes(schemes)
    quantizer = quantizer or default_quantizer(kl_batches[:2] if kl_batches else None)
    max_len = model_max_len(model)
    tok = as_tokenizer(tokenizer) if tokenizer is not None else None
    encoded = {} if encoded is None else encoded
    for t in tasks:
        if (t.name, max_len) not in encoded:
            encoded[(t.name, max_len)] = encode_task(t, tok, max_len)
    encoded = {t.name: encoded[(t.name, max_len)] for t in tasks}
    fp = {}
    for t in tasks:
        _say(progress, f"eval: {t.name} ({len(t)} items) [fp]")
        fp[t.name] = score_task(model, t, batch_size=batch_size, policy=policy, progress=progress,
                                label=f"{t.name} [fp]", encoded=encoded[t.name])
    results = {}
    for scheme in schemes:
        ts = time.perf_counter()
        _say(progress, f"eval: quantizing a copy with {scheme}")
        qmodel = quantizer(model, scheme)
        try:
            qs = {}
            for t in tasks:
                _say(progress, f"eval: {t.name} ({len(t)} items) [{scheme}]")
                qs[t.name] = score_task(qmodel, t, batch_size=batch_size, policy=policy, progress=progress,
                                        label=f"{t.name} [{scheme}]", encoded=encoded[t.name])
            kl = None
            if kl_batches:
                _say(progress, f"eval: KL(FP||Q) on {sum(b.numel() for b in kl_batches)} held-out tokens [{scheme}]")
                kl = kl_agreement(model, {scheme: qmodel}, kl_batches, policy=policy)[scheme]
        finally:
            del qmodel
        # the paper's metric is undefined for a task the FP model scores 0 on (early checkpoints)
        usable = [t.name for t in tasks if t.is_accuracy and fp[t.name].score > 0]
        interval = None
        if usable:
            interval = paired_bootstrap({n: fp[n].per_item[fp[n].primary] for n in usable},
                                        {n: qs[n].per_item[qs[n].primary] for n in usable},
                                        samples=eval_cfg.bootstrap_samples, confidence=eval_cfg.confidence,
                                        seed=seed)
        results[scheme] = SchemeResult(scheme, qs, interval, usable, kl, time.perf_counter() - ts)
    diag = None
    if eval_cfg.diagnostics:
        batches = diagnostic_batches if diagnostic_batches is not None else (kl_batches[:2] if kl_batches else None)
        if not batches:
            raise ValueError("evaluate: diagnostics need held-out batches")
        _say(progress, "eval: diagnostics")
        diag = analyze(model, batches, policy=policy)
    return EvalResult(fp, results, eval_cfg.confidence, diag, time.perf_counter() - t0,
                      meta={"tasks": {t.name: t.source for t in tasks}, "schemes": list(schemes)})


# ============================================================================ the train loop's hook


@dataclass
class EvalInputs:
    """What evaluation needs from the prepared data, gathered once."""

    tasks: list[Task]
    tokenizer: Any
    kl_batches: list[torch.Tensor]


def eval_inputs(cfg: Config, data: Any = None, *, tokenizer: Any = None,
                heldout_texts: Optional[Mapping[str, str]] = None, heldout_tokens: Any = None,
                task_seed: int = 0) -> EvalInputs:
    """Tasks and held-out KL batches of `cfg.eval`, from a `rayq.data.PreparedData` or explicit parts.

    `task_seed` is fixed (not the training seed) so every trial and seed is judged on the same items.
    """
    e = cfg.eval
    if data is not None:
        tokenizer = tokenizer if tokenizer is not None else data.tokenizer()
        if heldout_texts is None:
            heldout_texts = data.heldout_texts()
        if heldout_tokens is None:
            heldout_tokens = data.tokens("heldout")
    if tokenizer is None:
        raise UserError("evaluation needs a tokenizer (prepared data or --tokenizer)")
    tasks = load_tasks(e.tasks, e.task_paths, heldout_texts=heldout_texts, size=e.task_size, seed=task_seed)
    tasks = [fit_to_context(t, as_tokenizer(tokenizer), cfg.model.seq_len) for t in tasks]
    if heldout_tokens is None and heldout_texts:
        tok = as_tokenizer(tokenizer)
        heldout_tokens = [i for _, text in sorted(heldout_texts.items()) for i in tok.encode(text)]
    batches = []
    bos = getattr(data, "window_bos", None)  # the model saw BOS first in every sequence: so does KL
    window = cfg.model.seq_len - (bos is not None)
    if heldout_tokens is not None and window >= 1 and len(heldout_tokens) >= window:
        batches = token_batches(heldout_tokens, e.kl_tokens, window, e.batch_size)
        if bos is not None:
            batches = [with_bos(b, bos) for b in batches]
    return EvalInputs(tasks, tokenizer, batches)


def fit_to_context(task: Task, tok: Any, max_len: int) -> Task:
    """Drop the items whose scored continuation cannot fit the model's context with at least one
    token of context: truncating them would score a different (shorter) string. Contexts that are
    too long are cut from the left by the scorer, as lm-eval does."""
    def fits(item: Any) -> bool:
        if isinstance(item, MultipleChoice):
            return all(len(tok.encode(c)) < max_len for c in item.continuations)
        if isinstance(item, LastWord):
            return len(tok.encode(item.target)) < max_len
        return True

    kept = tuple(item for item in task.items if fits(item))
    if len(kept) == len(task.items):
        return task
    if not kept:
        raise UserError(f"task {task.name}: no item fits model.seq_len={max_len} tokens")
    print(f"[rayq.eval] {task.name}: {len(task.items) - len(kept)} of {len(task.items)} items dropped: their "
          f"continuation does not fit model.seq_len={max_len}", file=sys.stderr)
    return replace(task, items=kept)


def make_eval_hook(cfg: Config, data: Any = None, *, inputs: Optional[EvalInputs] = None,
                   quantizer: Optional[Quantizer] = None, progress: Progress = None, **parts: Any) -> EvalHook:
    """The train loop's `evaluator(model, step, policy) -> {metric: float}` for `cfg.eval`.

    Tasks are built and tokenized once here, not at every eval step. The hook scores the model it
    is given in eval mode (its train/eval state is restored) and quantizes deep copies only.
    """
    inputs = inputs or eval_inputs(cfg, data, **parts)
    if quantizer is None:
        check_schemes(cfg.eval.schemes)
    e = cfg.eval
    cache: dict = {}  # the tasks' token requests, tokenized at the first eval step only

    def hook(model: nn.Module, step: int, policy: Any = None) -> dict:
        result = evaluate(model, inputs.tasks, e, tokenizer=inputs.tokenizer, kl_batches=inputs.kl_batches,
                          policy=policy, quantizer=quantizer, progress=progress, encoded=cache)
        metrics = result.metrics()
        metrics[metric_names.eval_("seconds")] = float(result.seconds)
        return metrics

    hook.inputs = inputs  # type: ignore[attr-defined]
    return hook
