"""Serve a rayq checkpoint — FP or quantized — to lm-evaluation-harness (optional extra `lm-eval`).

    from rayq.eval.lm_eval_adapter import from_checkpoint
    import lm_eval
    lm = from_checkpoint("runs/demo", scheme="w8a8-vectorwise", tokenizer="tok.model")
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"])

lm-eval is imported on first use only (this module is not imported by `rayq.eval`), so rayq works
without it. The class is built lazily and registered with lm-eval as model "rayq", so
`simple_evaluate(model="rayq", model_args="checkpoint=...,scheme=...")` works once this module has
been imported. Scoring goes through `rayq.eval.scoring` — the same tokenization and batching as
`rayq eval`, so both report the same numbers for the same items.
"""

from __future__ import annotations

from typing import Any, Optional

_CLASS: dict[str, type] = {}


def _build_class() -> type:
    if "RayqLM" in _CLASS:
        return _CLASS["RayqLM"]
    try:
        from lm_eval.api.model import LM
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        from rayq.errors import UserError

        raise UserError(f"the lm-eval adapter needs lm-evaluation-harness: pip install 'rayq[lm-eval]' ({exc})") from None

    import torch

    from rayq.eval.evaluate import default_quantizer
    from rayq.eval.scoring import as_tokenizer, encode_pair, model_max_len, rolling_requests, score_tokens

    class RayqLM(LM):
        """An lm-eval `LM` over a rayq model: log-likelihoods, rolling log-likelihoods, greedy generation."""

        def __init__(self, model: Any = None, tokenizer: Any = None, *, checkpoint: Optional[str] = None,
                     scheme: Optional[str] = None, batch_size: int = 16, policy: Any = None, backend: str = "auto",
                     max_gen_toks: int = 64, device: Optional[str] = None):
            super().__init__()
            if checkpoint is not None:
                model, loaded_tok, policy = _load_checkpoint(checkpoint, tokenizer, device)
                tokenizer = loaded_tok
            if model is None or tokenizer is None:
                raise ValueError("RayqLM needs a model and a tokenizer, or checkpoint=PATH")
            if scheme:
                model = default_quantizer(backend=backend)(model, scheme)
            self.model = model.eval()
            self.tok = as_tokenizer(tokenizer)
            self.batch_size = int(batch_size)
            self.policy = policy
            self.max_gen_toks = int(max_gen_toks)
            self.scheme = scheme
            self.max_length = model_max_len(self.model)

        def _score(self, pairs):
            return score_tokens(self.model, pairs, batch_size=self.batch_size, max_len=self.max_length,
                                policy=self.policy)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [encode_pair(self.tok, *req.args[:2]) for req in requests]
            return [(s.logprob, s.greedy) for s in self._score(pairs)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                windows = rolling_requests(self.tok.encode(req.args[0]), self.max_length, self.tok.prefix_id)
                out.append(float(sum(s.logprob for s in self._score(windows))) if windows else 0.0)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            """Greedy decoding (sampling arguments are ignored) until a stop string or max_gen_toks."""
            from rayq.eval.scoring import autocast_of, eval_mode, model_device, no_grad_for

            out = []
            device = model_device(self.model)
            autocast = autocast_of(self.policy)
            for req in requests:
                context, kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {}) or {}
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                ids = self.tok.encode(context) or ([self.tok.prefix_id] if self.tok.prefix_id is not None else [])
                if not ids:
                    raise ValueError("generate_until: empty context and no EOS/BOS id")
                new: list[int] = []
                text = ""
                with no_grad_for(device), eval_mode(self.model):
                    for _ in range(budget):
                        x = torch.tensor([(ids + new)[-self.max_length:]], device=device)
                        with autocast():
                            logits = self.model(x)
                        new.append(int(logits[0, -1].argmax()))
                        text = self.tok.decode(new)
                        if any(u and u in text for u in until):
                            break
                for u in until:
                    if u and u in text:
                        text = text.split(u, 1)[0]
                out.append(text)
            return out

    try:
        from lm_eval.api.registry import register_model

        RayqLM = register_model("rayq")(RayqLM)
    except Exception:  # noqa: BLE001 - registration is a convenience; the class works without it
        pass
    _CLASS["RayqLM"] = RayqLM
    return RayqLM


def _load_checkpoint(path: str, tokenizer: Any, device: Optional[str]):
    """(model, tokenizer, policy) of a checkpoint; `tokenizer` may be a .model path, an object, or None
    (then the prepared data of the checkpoint's config provides it)."""
    from rayq import checkpoint as ckpt_io
    from rayq import data as data_io
    from rayq.precision import PrecisionPolicy

    loaded = ckpt_io.load_model(path, device or "auto")
    cfg = loaded.config
    if tokenizer is None:
        tokenizer = data_io.prepare(cfg.data, cfg.model.vocab_size).tokenizer()
    elif isinstance(tokenizer, str):
        import sentencepiece as spm

        tokenizer = spm.SentencePieceProcessor(model_file=tokenizer)
    device_type = next(loaded.model.parameters()).device.type
    return loaded.model, tokenizer, PrecisionPolicy.from_recipe(cfg.recipe, device_type)


def from_checkpoint(path: str, *, scheme: Optional[str] = None, tokenizer: Any = None, batch_size: int = 16,
                    backend: str = "auto", device: Optional[str] = None):
    """An lm-eval `LM` serving the checkpoint at `path` (FP, or quantized with `scheme`)."""
    return _build_class()(checkpoint=path, tokenizer=tokenizer, scheme=scheme, batch_size=batch_size,
                          backend=backend, device=device)


def __getattr__(name: str):
    if name == "RayqLM":
        return _build_class()
    raise AttributeError(name)
