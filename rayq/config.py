"""Config machinery: presets, YAML files and dotted overrides resolved into one frozen `Config`.

Precedence: dataclass defaults < preset/YAML file < `--set key=value` overrides < trial values
(the search applies those with `with_overrides`). Unknown keys are rejected with the closest
valid key named; types are checked against the dataclass annotations; ranges are checked by each
section's `__post_init__`. Errors are `ConfigError` with the dotted path first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from rayq import fs
from rayq.errors import ConfigError, UserError, did_you_mean
from rayq.schema import Config

PRESET_PACKAGE = "rayq.presets"
CLUSTER_CONFIGS = ("rayq.cluster", "configs")  # package data of the cluster room: shipped cluster files
# Limits of a config YAML: a config is a few KB; these stop a hostile or damaged file (a binary,
# a 5000-deep nesting, a billion-laughs alias bomb) with one line, before it costs time or memory.
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # scalars + collections after alias expansion
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_BASE_KEY = "base"  # a preset or file may start from another preset: `base: tiny`


# ----------------------------------------------------------------------------- typed building


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
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
        raise ConfigError(f"{path}: expected {type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        hint = did_you_mean(value, typing.get_args(tp))
        raise ConfigError(f"{path}: expected one of {type_name(tp)}, got {value!r}{hint}")
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
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf, .nan, or 1e400 (which float() rounds to inf)
                raise ConfigError(f"{path}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {type_name(tp)}, got {value!r}")


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
            in_config = cls is Config or cls is typing.get_type_hints(Config).get(path)
            hint = unknown_key_hint(where) if in_config else did_you_mean(key, names, cutoff=0.5)
            raise ConfigError(f"{where}: unknown key{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path + '.' if path else ''}{exc}") from None


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass (`recipe.weight_decay`, `eval.task_paths`, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def unknown_key_hint(dotted: str) -> str:
    """Did-you-mean for an unknown dotted key, across sections: a key that exists under the same
    name in another section is named there (`train.steps` -> `recipe.steps`), else the closest key."""
    section, _, leaf = dotted.rpartition(".")
    if not section:
        return did_you_mean(dotted, [f.name for f in dataclasses.fields(Config)])
    if "." not in section:
        elsewhere = [k for k in config_keys() if k.count(".") == 1 and k.endswith(f".{leaf}") and k != dotted]
        if elsewhere:
            return f"; did you mean {elsewhere[0]!r}?"
    return did_you_mean(dotted, config_keys(), cutoff=0.5)


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


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than `MAX_YAML_DEPTH` (PyYAML composes recursively,
    so a deep file would end in a RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(data: Any, budget: int) -> int:
    """Nodes of `data` with every alias expanded, counting stops once past `budget` (an alias bomb
    is a small graph that expands to billions of nodes; walking it to the end would take minutes)."""
    count, stack = 0, [data]
    while stack and count <= budget:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.load(text, Loader=_GuardedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if _expanded_size(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise UserError(f"{where}: expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases?); "
                        "expected a config of at most a few thousand values")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a YAML mapping of config sections, got {type(data).__name__}")
    return data


def preset_tree(name: str, _seen: tuple = ()) -> dict:
    """The raw nested dict of a preset, with its `base:` chain merged in."""
    names = list_presets()
    if name not in names:
        raise UserError(f"--preset {name}: unknown preset{did_you_mean(name, names)} "
                        f"(rayq ls presets: {', '.join(names)})")
    if name in _seen:
        raise UserError(f"preset {name}: circular base chain {' -> '.join(_seen + (name,))}")
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return _with_base(_read_yaml(text, f"preset {name}"), _seen + (name,))


def read_yaml_file(path: str | os.PathLike, what: str = "config") -> dict:
    """A YAML mapping from a file, or a one-line UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found")
    return _read_yaml(_read_text(p), str(p))


def _read_text(p: Path) -> str:
    """The text of a YAML file, or a one-line UserError for a huge or binary one."""
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UserError(f"{p}: {size:,} bytes; expected a YAML config file under {MAX_YAML_BYTES // 2**20} MB")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not a UTF-8 text file (byte {exc.start}); expected a YAML config") from None
    if "\x00" in text:
        raise UserError(f"{p}: holds NUL bytes; expected a YAML config, not a binary file")
    return text


def recipe_values(path: str | os.PathLike) -> dict:
    """Dotted values from an exported recipe file (its `recipe:` section)."""
    data = read_yaml_file(path, "recipe")
    if not isinstance(data.get("recipe"), dict):
        raise UserError(f"{path}: expected a 'recipe:' section (as written by rayq export)")
    return {f"recipe.{k}": v for k, v in data["recipe"].items()}


def shipped_cluster_files() -> dict[str, Any]:
    """Name -> shipped cluster file (package data): `gcp-tpu` -> configs/gcp-tpu.rayq.yaml. A
    launcher file without a `.rayq.yaml` sibling is listed under its own name."""
    package, folder = CLUSTER_CONFIGS
    root = resources.files(package).joinpath(folder)
    files = sorted((p for p in root.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name)
    out: dict[str, Any] = {}
    for p in files:  # x.rayq.yaml sorts before x.yaml, so the rayq file wins the short name
        short = p.name.removesuffix(".yaml").removesuffix(".rayq")
        out.setdefault(short, p)
    return out


def find_cluster_file(name_or_path: str | os.PathLike) -> Any:
    """A cluster file by path, or by the name of a shipped one (`gcp-tpu`). A path that does not
    exist but names a shipped file (`cluster/configs/gcp-tpu.rayq.yaml` from another directory,
    as exported launch commands spell it) resolves to the shipped file."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = shipped_cluster_files()
    short = p.name.removesuffix(".yaml").removesuffix(".rayq")
    if short in shipped and (p.parent == Path(".") or p.parent.name == "configs"):
        return shipped[short]
    raise UserError(f"--cluster {name_or_path}: no such file or shipped cluster{did_you_mean(short, shipped)} "
                    f"(shipped: {', '.join(shipped)})")


def cluster_values(name_or_path: str | os.PathLike) -> dict:
    """Dotted values from a cluster file: a `cluster:` section (or `rayq:` block of a launcher file)."""
    found = find_cluster_file(name_or_path)
    if isinstance(found, Path):
        data = read_yaml_file(found, "cluster")
    else:
        data = _read_yaml(found.read_text(), f"cluster {found.name}")
    section = data.get("cluster")
    if section is None and isinstance(data.get("rayq"), dict):  # Ray launcher files carry a rayq: block
        section = data["rayq"].get("cluster")
    if not isinstance(section, dict):
        raise UserError(f"{name_or_path}: expected a 'cluster:' section (or rayq: {{cluster: ...}} in a launcher file)")
    return {f"cluster.{k}": v for k, v in section.items()}


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
            os.fchmod(fh.fileno(), fs.file_mode())  # mkstemp's 0600 would ignore the umask
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_yaml(cfg))
