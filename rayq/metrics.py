"""The metric vocabulary: every name a run reports is built here, and nowhere else.

The train loop, the evaluator (`rayq.eval.evaluate`), the Ray glue and the search's objectives
all import these builders, so a name is spelled once and the search accepts exactly what the
evaluator reports. Names are `/`-separated paths:

    step, diverged                          the report's position and divergence flag
    checkpoint_path[/seed<k>]               where the report's checkpoint (of seed k) was committed
    train/<stat>                            train/loss, train/tokens_per_s, train/grad_norm, ...
    data/tokens, data/epochs                the train split's size and the passes over it so far
    eval/loss                               held-out loss of the FP model (every eval step)
    eval/<stat>                             eval/seconds, eval/node, eval/node_id (bookkeeping)
    ray/<stat>                              a Ray Train worker: report_seconds, report_backlog, ... (bookkeeping)
    fp/<task>/<m>                           a task's metric m of the FP model
    fp/<m>                                  the mean of m over the tasks that report m
    q/<scheme>/<task>/<m>, q/<scheme>/<m>   the same for the model quantized with <scheme>
    ptq/<scheme>/<key>                      degradation_pct (+ _ci_low, _ci_high), kl (+ _se),
                                            top1_agree (+ _se)
    diag/<stat>, diag/<site>/<stat>         weight/activation diagnostics, whole model or per site

Task metrics are named for what they are: `acc` (raw log-likelihood argmax), `acc_norm` (per
character), `acc_bytes` (per UTF-8 byte), `ppl`, `bpb`. An `acc_norm` is never reported as `acc`,
and `fp/acc` averages `acc` values only.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

STEP = "step"
DIVERGED = "diverged"
CHECKPOINT_PATH = "checkpoint_path"  # the committed checkpoint of a report (not a number)


def seed_checkpoint_path(seed_index: int) -> str:
    """A search report's checkpoint of its k-th seed (the report's metrics are the seeds' mean)."""
    return f"{CHECKPOINT_PATH}/seed{seed_index}"

# train/<stat>: what the loop reports at every log step
# (clip_frac: the fraction of steps since the last report whose gradients clipping scaled down)
TRAIN_STATS = ("loss", "tokens_per_s", "grad_norm", "lr", "loss_scale", "skipped_steps", "resumed_from", "node_id",
               "clip_frac", "wall_time")
# data/<stat>: the train split's size in tokens and the passes made over it so far
DATA_STATS = ("tokens", "epochs")
# ray/<stat>: how a Ray Train worker runs and what reporting costs its loop (`rayq bench train`)
RAY_STATS = ("report_seconds", "report_backlog", "torch_threads", "niceness")
# eval/<stat>: held-out loss and the evaluator's bookkeeping
EVAL_STATS = ("loss", "seconds", "node", "node_id")
# a task's metrics (eval.scoring reports these per task kind)
TASK_METRICS = ("acc", "acc_norm", "acc_bytes", "ppl", "bpb")
# metrics averaged over tasks into fp/<m> and q/<scheme>/<m>: always reported (NaN when no task has m)
MEAN_METRICS = ("acc", "acc_norm", "acc_bytes")
PTQ_KEYS = ("degradation_pct", "degradation_pct_ci_low", "degradation_pct_ci_high",
            "kl", "kl_se", "top1_agree", "top1_agree_se")


def _known(part: str, allowed: tuple[str, ...], family: str) -> str:
    if part not in allowed:  # a programming error, not user input: the vocabulary is closed
        raise ValueError(f"{part!r} is not a {family} metric (known: {', '.join(allowed)})")
    return part


def train(stat: str) -> str:
    return f"train/{_known(stat, TRAIN_STATS, 'train')}"


def ray(stat: str) -> str:
    return f"ray/{_known(stat, RAY_STATS, 'ray')}"


def data(stat: str) -> str:
    return f"data/{_known(stat, DATA_STATS, 'data')}"


def eval_(stat: str) -> str:
    return f"eval/{_known(stat, EVAL_STATS, 'eval')}"


TRAIN_LOSS = train("loss")
TOKENS_PER_S = train("tokens_per_s")
EVAL_LOSS = eval_("loss")


def fp(task: Optional[str], metric: str) -> str:
    """`fp/<task>/<metric>`, or the mean over tasks `fp/<metric>` when task is None."""
    metric = _known(metric, TASK_METRICS, "task")
    return f"fp/{metric}" if task is None else f"fp/{task}/{metric}"


def q(scheme: str, task: Optional[str], metric: str) -> str:
    """`q/<scheme>/<task>/<metric>`, or the mean over tasks `q/<scheme>/<metric>` when task is None."""
    metric = _known(metric, TASK_METRICS, "task")
    return f"q/{scheme}/{metric}" if task is None else f"q/{scheme}/{task}/{metric}"


def ptq(scheme: str, key: str) -> str:
    return f"ptq/{scheme}/{_known(key, PTQ_KEYS, 'ptq')}"


def diag(stat: str, site: Optional[str] = None) -> str:
    """`diag/<stat>` (whole model) or `diag/<site>/<stat>` (one linear's input, e.g. site `blocks.0.attn.qkv`)."""
    return f"diag/{stat}" if site is None else f"diag/{site}/{stat}"


# ----------------------------------------------------------------------------- legal objectives

_PART = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"
_ALT = "|".join
# (pattern, family); named groups `task` and `scheme` are checked against the config when known
PATTERNS = (
    re.compile(rf"(?:{STEP}|{DIVERGED})"),
    re.compile(rf"train/(?:{_ALT(TRAIN_STATS)})"),
    re.compile(rf"eval/(?:{_ALT(EVAL_STATS)})"),
    re.compile(rf"data/(?:{_ALT(DATA_STATS)})"),
    re.compile(rf"fp/(?:{_ALT(MEAN_METRICS)})"),
    re.compile(rf"fp/(?P<task>{_PART})/(?:{_ALT(TASK_METRICS)})"),
    re.compile(rf"q/(?P<scheme>{_PART})/(?:{_ALT(MEAN_METRICS)})"),
    re.compile(rf"q/(?P<scheme>{_PART})/(?P<task>{_PART})/(?:{_ALT(TASK_METRICS)})"),
    re.compile(rf"ptq/(?P<scheme>{_PART})/(?:{_ALT(PTQ_KEYS)})"),
    re.compile(rf"diag/{_PART}(?:/{_PART})*"),
)
# bookkeeping names a report carries that are not quantities to optimize
_NOT_OBJECTIVES = {eval_("seconds"), eval_("node"), eval_("node_id"), train("node_id"), train("resumed_from"),
                   train("wall_time"), data("tokens")}


def is_objective(name: str, tasks: Optional[Iterable[str]] = None, schemes: Optional[Iterable[str]] = None) -> bool:
    """Whether `name` is a metric a trial reports that a search may optimize or constrain.

    With `tasks`/`schemes` None their parts are only checked for shape.
    """
    if name in _NOT_OBJECTIVES:
        return False
    tasks_l = None if tasks is None else list(tasks)
    schemes_l = None if schemes is None else list(schemes)
    for pattern in PATTERNS:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        groups = m.groupdict()
        if groups.get("task") is not None and tasks_l is not None and groups["task"] not in tasks_l:
            return False
        if groups.get("scheme") is not None and schemes_l is not None and groups["scheme"] not in schemes_l:
            return False
        return True
    return False


def objective_names(tasks: Iterable[str] = (), schemes: Iterable[str] = ()) -> list[str]:
    """Every objective a trial can report for these eval tasks and schemes (diag/... aside:
    which diagnostics exist depends on the model), for listings and did-you-mean hints."""
    tasks, schemes = list(tasks), list(schemes)
    names = [STEP, DIVERGED, *(train(s) for s in TRAIN_STATS if train(s) not in _NOT_OBJECTIVES), EVAL_LOSS]
    names += [data(s) for s in DATA_STATS if data(s) not in _NOT_OBJECTIVES]
    names += [fp(None, m) for m in MEAN_METRICS]
    names += [fp(t, m) for t in tasks for m in TASK_METRICS]
    for s in schemes:
        names += [q(s, None, m) for m in MEAN_METRICS]
        names += [q(s, t, m) for t in tasks for m in TASK_METRICS]
        names += [ptq(s, k) for k in PTQ_KEYS]
    return names
