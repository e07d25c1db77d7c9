"""Quantization schemes as frozen config objects, each registered under a stable CLI name.

As in torchao, a scheme is data (what to do), not behaviour: `quantize_(model, scheme)` looks
up the handler registered for the scheme's type (in `rayq.kernels.quantize`). The CLI and the
YAML configs name schemes by string (`w8a8-vectorwise`); `scheme_from_name` turns a name plus
keyword fields into the config object, and `list_schemes` feeds `rayq ls quant`.

All schemes are symmetric absmax quantizers (zero point 0): the paper's setting, and the only
one where an INT8 x INT8 -> INT32 GEMM needs no zero-point correction terms.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, ClassVar


class SchemeError(ValueError):
    """Bad quantization input: unknown scheme, bad field, no matching layers, non-finite input.

    A ValueError so that generic callers still catch it; `rayq.cli` turns it into a one-line
    message and exit code 2.
    """


@dataclass(frozen=True)
class Scheme:
    """Base of all schemes. Subclasses set `name` (CLI name) and `description` (one line)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    weight_bits: ClassVar[int] = 8
    act_bits: ClassVar[int | None] = 8  # None: weight-only, activations stay in floating point
    needs_calibration: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """{"name": ..., **fields}: what save files and run configs record."""
        return {"name": self.name, **dataclasses.asdict(self)}


_REGISTRY: dict[str, type[Scheme]] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: make a scheme listable and constructible by its CLI name."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"scheme name missing or registered twice: {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise SchemeError(message)


@register_scheme
@dataclass(frozen=True)
class W8A8Vectorwise(Scheme):
    """The paper's scheme (LLM.int8() without the outlier decomposition)."""

    name: ClassVar[str] = "w8a8-vectorwise"
    description: ClassVar[str] = "per-token activation x per-output-channel weight absmax INT8, INT32 GEMM (the paper's)"


@register_scheme
@dataclass(frozen=True)
class W8A8PerTensor(Scheme):
    """Naive baseline: one scale for the whole activation tensor and one for the weight.

    static=False computes the activation scale at run time from the whole batch; static=True
    fixes it from calibration data (the max |x| seen), as a deployment without run-time
    reductions would, and clamps anything larger.
    """

    name: ClassVar[str] = "w8a8-tensor"
    description: ClassVar[str] = "per-tensor activation and weight absmax INT8 (naive baseline; static or dynamic)"
    static: bool = False
    calibration_batches: int = 8  # used only when static=True

    def __post_init__(self) -> None:
        _check(self.calibration_batches >= 1, f"w8a8-tensor: calibration_batches must be >= 1, got {self.calibration_batches}")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.static


@register_scheme
@dataclass(frozen=True)
class W4Colwise(Scheme):
    """The paper's 4-bit weight-only scheme (§4): one absmax scale per output channel, codes in
    [-7, 7] (symmetric, so -8 is unused), stored packed two per byte; activations stay FP."""

    name: ClassVar[str] = "w4-colwise"
    description: ClassVar[str] = "weight-only INT4 (packed two per byte), per-output-channel absmax; activations FP"
    weight_bits: ClassVar[int] = 4
    act_bits: ClassVar[int | None] = None


@register_scheme
@dataclass(frozen=True)
class W8A8SmoothQuant(Scheme):
    """SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights with a
    per-input-channel factor s_j = max|X_j|^alpha / max|W_j|^(1-alpha), then vector-wise W8A8.

    The factors come from calibration batches passed to `quantize_(..., calibration=...)`.
    """

    name: ClassVar[str] = "w8a8-smoothquant"
    description: ClassVar[str] = "SmoothQuant: calibrated per-channel migration (alpha) of activation outliers, then vector-wise W8A8"
    needs_calibration: ClassVar[bool] = True
    alpha: float = 0.5
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, f"w8a8-smoothquant: alpha must be in [0, 1], got {self.alpha}")
        _check(self.calibration_batches >= 1, f"w8a8-smoothquant: calibration_batches must be >= 1, got {self.calibration_batches}")


@register_scheme
@dataclass(frozen=True)
class W8A8Groupwise(Scheme):
    """ZeroQuant-style: weights get one scale per (output channel, group of `group_size` input
    channels); activations per token. Each group is its own INT32 GEMM, rescaled and summed."""

    name: ClassVar[str] = "w8a8-group"
    description: ClassVar[str] = "ZeroQuant group-wise INT8 weights (group_size along K) with per-token INT8 activations"
    group_size: int = 128

    def __post_init__(self) -> None:
        _check(self.group_size >= 1, f"w8a8-group: group_size must be >= 1, got {self.group_size}")


def list_schemes() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered scheme, in registration order."""
    return [(name, cls.description) for name, cls in _REGISTRY.items()]


def scheme_class(name: str) -> type[Scheme]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SchemeError(f"unknown quantization scheme {name!r}{hint} (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def scheme_from_name(name: str, **kwargs: Any) -> Scheme:
    """`scheme_from_name("w8a8-group", group_size=64)` -> W8A8Groupwise(group_size=64)."""
    cls = scheme_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        allowed = ", ".join(sorted(fields)) or "none"
        raise SchemeError(f"{name}: unknown field {unknown[0]!r}{hint} (fields: {allowed})")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong type of a field value
        raise SchemeError(f"{name}: {exc}") from None


def scheme_from_dict(d: dict[str, Any]) -> Scheme:
    """Inverse of `Scheme.to_dict` (used by save files)."""
    d = dict(d)
    return scheme_from_name(d.pop("name"), **d)


def as_scheme(scheme: Scheme | str) -> Scheme:
    """Accept a config object or a CLI name."""
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, str):
        return scheme_from_name(scheme)
    raise SchemeError(f"expected a quantization scheme or its name, got {type(scheme).__name__}")
