"""Log-likelihood scoring: batched, right-padded, on any device; the same code scores FP and INT8.

The model interface is just `forward(idx[B, T]) -> logits[B, T, V]` (a causal LM), so the FP GPT,
its quantized copies and a hand-made bigram model in the tests go through identical code.

Tokenization follows lm-evaluation-harness: a request is (context, continuation); trailing
spaces of the context move to the continuation; the pair is encoded as one string and split
where the context's own encoding stops (so SentencePiece sees the text it would see in a
document). A context that does not fit is cut from the left; the continuation never is.

Per-item results are kept (not only means), because the degradation's paired bootstrap
resamples items.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rayq.eval.tasks import LAST_WORD, MULTIPLE_CHOICE, PERPLEXITY, LastWord, MultipleChoice, Passage, Task

Progress = Optional[Callable[[str], None]]


# ============================================================================ tokenizers


class TextTokenizer:
    """Adapter: anything with `encode(str) -> list[int]` (SentencePieceProcessor, PreparedData, a
    toy char tokenizer).

    `prefix_id` is the token an empty context (and a rolling perplexity window's first token) is
    conditioned on: EOS when the tokenizer has one — rayq's token stream separates documents with
    EOS, so "after EOS" is what the model saw at every document start; lm-eval's HF models use EOT
    the same way — else BOS, else None (then the first token of a passage is not scored)."""

    def __init__(self, inner: Any):
        self.inner = inner
        if hasattr(inner, "tokenizer") and callable(inner.tokenizer) and not hasattr(inner, "encode_as_ids"):
            inner = inner.tokenizer()  # rayq.data.PreparedData -> its SentencePieceProcessor
        self._tok = inner
        self.prefix_id: Optional[int] = None
        for attr in ("eos_id", "bos_id"):
            value = getattr(inner, attr, None)
            value = value() if callable(value) else value
            if value is not None and int(value) >= 0:
                self.prefix_id = int(value)
                break

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return [int(t) for t in self._tok.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def as_tokenizer(tok: Any) -> TextTokenizer:
    return tok if isinstance(tok, TextTokenizer) else TextTokenizer(tok)


def encode_pair(tok: TextTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) such that their concatenation encodes context+continuation."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    k = 0  # the longest common prefix: the split where the context's own encoding agrees
    while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
        k += 1
    k = min(k, len(whole) - 1)  # score at least one token
    if k == 0 and tok.prefix_id is not None:
        return [tok.prefix_id], whole
    return whole[:k], whole[k:]


# ============================================================================ core: token requests


@dataclass(frozen=True)
class TokenScore:
    logprob: float  # sum of log p(continuation token | prefix), natural log
    greedy: bool  # argmax decoding reproduces every continuation token
    n_tokens: int


def model_max_len(model: nn.Module, default: int = 2048) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "seq_len", getattr(model, "max_len", default)))


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def autocast_of(policy: Any):
    """The recipe's autocast context factory of a `PrecisionPolicy`, or a null context without one."""
    return policy.autocast if policy is not None else contextlib.nullcontext


def no_grad_for(device: torch.device):
    """inference_mode where it is allowed; plain no_grad on XLA, whose F.linear rejects inference
    tensors ("Cannot set version_counter for inference tensor")."""
    return torch.no_grad() if device.type == "xla" else torch.inference_mode()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Dropout off while scoring; the caller's train/eval state is restored (the train loop's model)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _progress_every(progress: Progress, total: int, label: str, seconds: float = 5.0):
    last = [time.monotonic()]

    def tick(done: int) -> None:
        if progress is not None and time.monotonic() - last[0] > seconds:
            last[0] = time.monotonic()
            progress(f"{label}: {done}/{total}")

    return tick


def score_tokens(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                 batch_size: int = 16, max_len: Optional[int] = None, policy: Any = None,
                 progress: Progress = None, label: str = "scoring") -> list[TokenScore]:
    """Log-likelihood of each continuation given its context, for (context ids, continuation ids).

    Requests are sorted longest first so each padded batch wastes little; results come back in
    request order. Right padding is harmless for a causal model: no real position sees it.
    """
    max_len = max_len or model_max_len(model)
    device = model_device(model)
    prepared = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's {max_len}")
        if not ctx:
            raise ValueError(f"request {i}: empty context (the tokenizer has no EOS/BOS id to condition on)")
        full = (ctx + cont)[-(max_len + 1):]  # cut the context from the left to fit
        prepared.append((i, full[:-1], cont))
    order = sorted(prepared, key=lambda r: -len(r[1]))
    out: list[Optional[TokenScore]] = [None] * len(requests)
    tick = _progress_every(progress, len(order), label)
    autocast = autocast_of(policy)
    with no_grad_for(device), eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = len(chunk[0][1])
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, (_, inp, _) in enumerate(chunk):
                x[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            with autocast():
                logits = model(x.to(device))
            # only the scored positions are normalized: (tokens scored, V), not (B, T, V) — matters
            # for a 51200 vocabulary; per-request sums by index_add, one device->host copy per batch
            b_idx, t_idx, targets = [], [], []
            for b, (_, inp, cont) in enumerate(chunk):
                n = len(cont)
                b_idx += [b] * n
                t_idx += range(len(inp) - n, len(inp))
                targets += cont
            dev = logits.device
            rows = logits[torch.tensor(b_idx, device=dev), torch.tensor(t_idx, device=dev)].float()  # (N, V)
            target = torch.tensor(targets, device=dev)
            seg = torch.tensor(b_idx, device=dev)
            tok_ll = F.log_softmax(rows, dim=-1).gather(1, target[:, None]).squeeze(1)
            acc = torch.float32 if dev.type == "xla" else torch.float64  # TPUs have no fast float64
            ll = torch.zeros(len(chunk), dtype=acc, device=dev).index_add_(0, seg, tok_ll.to(acc))
            misses = torch.zeros(len(chunk), device=dev).index_add_(0, seg, (rows.argmax(-1) != target).float())
            for (i, _, cont), value, miss in zip(chunk, ll.cpu().tolist(), misses.cpu().tolist()):
                out[i] = TokenScore(value, miss == 0, len(cont))
            tick(start + len(chunk))
    return out  # type: ignore[return-value]


def rolling_requests(ids: Sequence[int], max_len: int, prefix_id: Optional[int] = None) -> list[tuple[list, list]]:
    """Token requests that score every token of `ids` exactly once with the most context that fits
    (lm-eval's rolling windows). Without a prefix id the first token has no context and is not scored."""
    seq = ([prefix_id] if prefix_id is not None else []) + list(ids)
    out = []
    a = 1
    while a < len(seq):
        b = min(a + max_len, len(seq))
        s = max(0, b - 1 - max_len)
        out.append((seq[s:a], seq[a:b]))
        a = b
    return out


# ============================================================================ tasks


@dataclass
class TaskScores:
    """One task scored by one model: metric means plus per-item values for the bootstrap."""

    name: str
    kind: str
    primary: str
    n: int
    metrics: dict[str, float]
    per_item: dict[str, np.ndarray] = field(repr=False)

    @property
    def score(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict:
        return {"task": self.name, "kind": self.kind, "primary": self.primary, "n": self.n, **self.metrics}


def task_requests(task: Task, tok: TextTokenizer, max_len: int) -> tuple[list, list]:
    """Flatten a task into token requests; returns (requests, layout) where layout maps items to them."""
    requests, layout = [], []
    for item in task.items:
        if isinstance(item, MultipleChoice):
            first = len(requests)
            requests += [encode_pair(tok, c, x) for c, x in zip(item.contexts, item.continuations)]
            layout.append((first, len(requests)))
        elif isinstance(item, LastWord):
            layout.append((len(requests), len(requests) + 1))
            requests.append(encode_pair(tok, item.context, item.target))
        elif isinstance(item, Passage):
            windows = rolling_requests(tok.encode(item.text), max_len, tok.prefix_id)
            layout.append((len(requests), len(requests) + len(windows)))
            requests += windows
        else:
            raise TypeError(f"task {task.name}: unknown item type {type(item).__name__}")
    return requests, layout


def reduce_task(task: Task, scores: Sequence[TokenScore], layout: Sequence[tuple[int, int]]) -> TaskScores:
    """Per-item metrics from the per-request scores (pure: unit-tested without a model)."""
    n = len(task.items)
    if task.kind == MULTIPLE_CHOICE:
        acc, acc_norm, acc_bytes = np.zeros(n), np.zeros(n), np.zeros(n)
        for k, (item, (a, b)) in enumerate(zip(task.items, layout)):
            ll = np.array([s.logprob for s in scores[a:b]])
            chars = np.array([max(1, len(c)) for c in item.continuations])
            nbytes = np.array([max(1, len(c.encode("utf-8"))) for c in item.continuations])
            # ties go to the first choice (np.argmax), as in lm-eval
            acc[k] = float(np.argmax(ll) == item.label)
            acc_norm[k] = float(np.argmax(ll / chars) == item.label)
            acc_bytes[k] = float(np.argmax(ll / nbytes) == item.label)
        per = {"acc": acc, "acc_norm": acc_norm, "acc_bytes": acc_bytes}
        metrics = {k: float(v.mean()) for k, v in per.items()}
    elif task.kind == LAST_WORD:
        acc = np.array([float(scores[a].greedy) for a, _ in layout])
        logprob = np.array([scores[a].logprob for a, _ in layout])
        per = {"acc": acc, "logprob": logprob}
        # lm-eval's LAMBADA perplexity: exp of the mean negative log-likelihood of the target words
        metrics = {"acc": float(acc.mean()), "ppl": float(math.exp(-logprob.mean()))}
    elif task.kind == PERPLEXITY:
        nll = np.array([-sum(s.logprob for s in scores[a:b]) for a, b in layout])
        tokens = np.array([sum(s.n_tokens for s in scores[a:b]) for a, b in layout])
        nbytes = np.array([len(item.text.encode("utf-8")) for item in task.items])
        per = {"nll": nll, "tokens": tokens, "bytes": nbytes}
        metrics = {"bpb": float(nll.sum() / math.log(2) / max(1, nbytes.sum())),
                   "ppl": float(math.exp(nll.sum() / max(1, tokens.sum()))),
                   "tokens": float(tokens.sum())}
    else:
        raise ValueError(f"task {task.name}: unknown kind {task.kind}")
    return TaskScores(task.name, task.kind, task.primary, n, metrics, per)


def encode_task(task: Task, tokenizer: Any, max_len: int) -> tuple[list, list]:
    return task_requests(task, as_tokenizer(tokenizer), max_len)


def score_task(model: nn.Module, task: Task, tokenizer: Any = None, *, batch_size: int = 16, policy: Any = None,
               progress: Progress = None, label: str = "", encoded: Optional[tuple[list, list]] = None) -> TaskScores:
    """Score a task; pass `encoded=encode_task(...)` to tokenize once for several models."""
    max_len = model_max_len(model)
    requests, layout = encoded if encoded is not None else encode_task(task, tokenizer, max_len)
    scores = score_tokens(model, requests, batch_size=batch_size, max_len=max_len, policy=policy,
                          progress=progress, label=label or task.name)
    return reduce_task(task, scores, layout)
