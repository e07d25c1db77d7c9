"""Config machinery: presets, YAML files and dotted overrides resolved into one frozen `Config`.

Precedence: dataclass defaults < preset/YAML file < `--set key=value` overrides < trial values
(the search applies those with `with_overrides`). Unknown keys are rejected with the closest
valid key named; types are checked against the dataclass annotations; ranges are checked by each
section's `__post_init__`. Errors are `ConfigError` with the dotted path first.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import tempfile
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from rayq.errors import ConfigError, UserError
from rayq.schema import Config

PRESET_PACKAGE = "rayq.presets"
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_BASE_KEY = "base"  # a preset or file may start from another preset: `base: tiny`


# ----------------------------------------------------------------------------- typed building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp` and return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path + '.' if path else ''}{exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (YAML/JSON-safe)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`recipe.grad_clip=null` -> ("recipe.grad_clip", None); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value, e.g. recipe.weight_decay=0.1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating mappings on the way (validated later by `build`)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "space":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- presets and files


def list_presets() -> list[str]:
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a YAML mapping of config sections, got {type(data).__name__}")
    return data


def preset_tree(name: str, _seen: tuple = ()) -> dict:
    """The raw nested dict of a preset, with its `base:` chain merged in."""
    names = list_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"--preset {name}: unknown preset{hint} (rayq ls presets: {', '.join(names)})")
    if name in _seen:
        raise UserError(f"preset {name}: circular base chain {' -> '.join(_seen + (name,))}")
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return _with_base(_read_yaml(text, f"preset {name}"), _seen + (name,))


def read_yaml_file(path: str | os.PathLike, what: str = "config") -> dict:
    """A YAML mapping from a file, or a one-line UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found")
    return _read_yaml(p.read_text(), str(p))


def file_tree(path: str | os.PathLike) -> dict:
    return _with_base(read_yaml_file(path), ())


def _with_base(tree: dict, seen: tuple) -> dict:
    base = tree.pop(_BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{_BASE_KEY}: expected a preset name, got {base!r}")
    return _merge(preset_tree(base, seen), tree)


def resolve(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
    file_values: Mapping[str, Any] | None = None,
) -> Config:
    """The one way to a `Config`: defaults < preset < file < `file_values` < `--set` < `values`.

    `values` maps dotted paths to already-typed values (trial values of a search);
    `file_values` are dotted values read from side files (an exported recipe, a cluster file).
    """
    tree: dict = {}
    if preset is not None:
        tree = _merge(tree, preset_tree(preset))
    if config_file is not None:
        tree = _merge(tree, file_tree(config_file))
    for key, value in (file_values or {}).items():
        set_dotted(tree, key, value)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    for key, value in (values or {}).items():
        set_dotted(tree, key, value)
    return build(Config, tree)


def get_dotted(cfg: Any, dotted: str) -> Any:
    """The value at a dotted path of a config (`recipe.weight_decay`)."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def with_values(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with dotted-path values applied and re-validated."""
    tree = to_dict(cfg)
    for key, value in values.items():
        set_dotted(tree, key, value)
    return build(Config, tree)


def config_hash(cfg: Config, sections: Iterable[str] | None = None) -> str:
    """Stable short hash of the config (or of some sections), for caching and provenance."""
    tree = to_dict(cfg)
    if sections is not None:
        tree = {k: tree[k] for k in sections}
    blob = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write_text` for bytes (Parquet tables, PNGs): a temporary file, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_yaml(cfg))
