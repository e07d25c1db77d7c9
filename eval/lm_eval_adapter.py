"""Serve a rayq checkpoint — FP or quantized — to lm-evaluation-harness (optional extra `lm-eval`).

    from rayq.eval.lm_eval_adapter import from_checkpoint
    import lm_eval
    lm = from_checkpoint("runs/demo", scheme="w8a8-vectorwise", tokenizer="tok.model")
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"])

Importing this module registers the model name "rayq" with lm-eval (as a lazy "module:attr"
placeholder, so lm-eval itself is imported only when a model is built), after which
`simple_evaluate(model="rayq", model_args="pretrained=RUN,scheme=w8a8-vectorwise")` works;
`rayq lm-eval ...` (`rayq.eval.lm_eval_cli`) does that import before handing argv to lm-eval's
own CLI. rayq works without lm-eval: `rayq.eval` does not import this module. Scoring goes through
`rayq.eval.scoring` — the same tokenization and batching as `rayq eval`, so both report the same
numbers for the same items.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

_CLASS: dict[str, type] = {}
MODEL_NAME = "rayq"
# lm-eval's batch_size=auto probes the largest batch that fits a GPU; rayq's models are small and
# scoring batches are padded to the longest item, so a fixed moderate batch is what "auto" means here.
AUTO_BATCH_SIZE = 32


def _batch_size(value: Any) -> int:
    text = str(value).strip().lower()
    if text.startswith("auto"):  # lm-eval also passes "auto:N" (N re-probes)
        return AUTO_BATCH_SIZE
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"batch_size: expected a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size: expected a positive integer or 'auto', got {value!r}")
    return size


def _device(requested: Optional[str]) -> str:
    """The device to serve on: as requested, but CPU when CUDA is asked for (or implied) and absent."""
    import torch

    wants_cuda = requested is None or str(requested).startswith("cuda")
    if not wants_cuda:
        return str(requested)
    if not torch.cuda.is_available():
        return "cpu"
    return str(requested or "cuda")


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
                     pretrained: Optional[str] = None, scheme: Optional[str] = None, batch_size: Any = 16,
                     max_batch_size: Any = None, policy: Any = None, backend: str = "auto",
                     max_gen_toks: int = 64, device: Optional[str] = None):
            super().__init__()
            if checkpoint is not None and pretrained is not None and str(checkpoint) != str(pretrained):
                raise ValueError("give the checkpoint once: checkpoint= or pretrained=, not both")
            checkpoint = checkpoint if checkpoint is not None else pretrained
            if checkpoint is not None:
                model, loaded_tok, policy = _load_checkpoint(str(checkpoint), tokenizer, _device(device))
                tokenizer = loaded_tok
            if model is None or tokenizer is None:
                raise ValueError("RayqLM needs a model and a tokenizer, or checkpoint=PATH")
            if scheme and str(scheme).lower() not in ("fp", "none"):
                model = default_quantizer(backend=backend)(model, str(scheme))
            else:
                scheme = None
            self.model = model.eval()
            self.tok = as_tokenizer(tokenizer)
            self.batch_size = _batch_size(batch_size)
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
    carried = Path(loaded.path).parent.parent / data_io.RUN_TOKENIZER  # a run dir carries its tokenizer
    if tokenizer is None and carried.is_file():
        tokenizer = str(carried)
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


def register() -> bool:
    """Register "rayq" with lm-eval's model registry (lazily: the class is built on first use).

    Returns False when lm-eval is not installed. Idempotent, so importing this module twice or
    calling it from `rayq lm-eval` after the import does not trip lm-eval's duplicate check."""
    try:
        import lm_eval.models  # noqa: F401 - its built-in names first: lm-eval loads them only into an empty registry
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"{__name__}:RayqLM")
    return True


register()
