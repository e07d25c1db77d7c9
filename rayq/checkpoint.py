"""Checkpoint I/O: one directory per checkpoint, written atomically, loaded with weights_only.

Layout of `step_N/`:
  model.pt      model state dict (fp32 master weights)
  optim.pt      optimizer state dict
  trainer.pt    step, loss-scaler state, RNG states, data position, counters
  config.yaml   the resolved config (so a checkpoint alone says what produced it)

A sharded checkpoint (the FSDP and SPMD strategies of `rayq.parallel`) has `.metadata` and
`__<rank>_0.distcp` (torch.distributed.checkpoint, DCP) in place of model.pt / optim.pt, with the
optimizer state keyed by parameter names; `load` reads it as a full, unsharded state dict, so
everything that reads a checkpoint works on both layouts. `load_model(path, device)` is the one
way to get a model back out of a checkpoint (`rayq eval`, the evaluator task, the lm-eval adapter).

Writers build the directory under a temporary name next to its destination and rename it in one
step, so a killed run leaves either the old checkpoint or the new one, never half of one.
Everything is loaded with `torch.load(weights_only=True)`: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from rayq import config as config_io
from rayq import fs
from rayq.errors import UserError
from rayq.model import GPT
from rayq.safe_dcp import SafeFileSystemReader, refusal
from rayq.schema import Config

FILES = ("model.pt", "optim.pt", "trainer.pt", "config.yaml")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def write(directory: str | os.PathLike, *, model_state: Optional[dict], optim_state: Optional[dict],
          trainer_state: dict, cfg: Config) -> None:
    """Write checkpoint files into an existing (staging) directory (model_state None: the model
    and optimizer are in sharded DCP files written beside these). Each file is fsynced, so the
    rename in `commit` never publishes a directory whose data is still only in the page cache."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if model_state is not None:
        _save(model_state, d / "model.pt")
    if optim_state is not None:
        _save(optim_state, d / "optim.pt")
    _save(trainer_state, d / "trainer.pt")
    with open(d / "config.yaml", "w", encoding="utf-8") as fh:
        fh.write(config_io.dump_yaml(cfg))
        fh.flush()
        os.fsync(fh.fileno())


def _save(obj: Any, path: Path) -> None:
    # through a Python file object: a full disk surfaces as OSError(ENOSPC), not torch's generic
    # "file write failed" RuntimeError
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def commit(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Atomically move a finished staging directory to its final name (replacing an old one):
    the staged files and the directory are fsynced first, the parent after the rename."""
    staging, final = Path(staging), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():  # DCP shard files are written by torch: sync them here too
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fs.fsync_dir(staging)
    if final.exists():  # re-written after a resume: move the old one aside first, then drop it
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fs.fsync_dir(final.parent)
    return final


def staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh, empty directory next to where `name` will be committed (same filesystem), with
    the permissions the umask gives (mkdtemp's private 0700 would make checkpoints unreadable to
    the group a shared run directory is meant for)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    os.chmod(path, fs.dir_mode())
    return path


@contextmanager
def staged(staging: Optional[str | os.PathLike], what: str = "checkpoint"):
    """Around writing into a staging dir: on any failure the staging dir is removed (a retry
    starts clean), and an OSError (a full disk, a read-only filesystem) becomes one `UserError`."""
    try:
        yield
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        os_error = _os_error_in(exc)
        if os_error is not None:
            raise UserError(fs.os_error_message(os_error, staging or ".", what)) from None
        raise


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`: torch.save re-raises a failed write (ENOSPC) as a RuntimeError
    from its zip writer's cleanup, with the OSError as the context."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _load(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file missing (expected {', '.join(FILES)})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        why = refusal(exc)
        raise UserError(f"{path}: refused: {why}" if why
                        else f"{path}: corrupted or truncated checkpoint file ({type(exc).__name__})") from None


def load(directory: str | os.PathLike, *, with_optimizer: bool = True) -> dict:
    """Read a checkpoint directory: {"model", "optim", "trainer", "config"}."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: not a checkpoint directory")
    if is_sharded(d):
        try:
            out = load_full_state_dict(d, with_optimizer=with_optimizer)
        except UserError:  # a refused or damaged file, already named in one line
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException  # noqa: BLE001 - many types for missing or damaged shards
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{d}: corrupted or incomplete sharded checkpoint ({detail})") from None
        out["trainer"] = _load(d / "trainer.pt")
    else:
        out = {"model": _load(d / "model.pt"), "trainer": _load(d / "trainer.pt")}
        out["optim"] = _load(d / "optim.pt") if with_optimizer and (d / "optim.pt").exists() else None
    _check_types(d, out)
    out["config"] = load_config(d)
    return out


def _check_types(d: Path, state: dict) -> None:
    """A file that loads but holds the wrong kind of object (a tensor where a state dict belongs)
    is a damaged checkpoint, said in one line, not an AttributeError deep in a caller."""
    expected = {"model": "a state dict of tensors", "trainer": "a dict", "optim": "an optimizer state dict"}
    for key, text in expected.items():
        value = state.get(key)
        if key == "optim" and value is None:
            continue
        ok = isinstance(value, dict)
        if ok and key == "model":
            ok = all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
        if ok and key == "optim":
            ok = isinstance(value.get("state"), dict) and isinstance(value.get("param_groups"), list)
        if not ok:
            name = f"{key}.pt" if key != "optim" or not is_sharded(d) else ".metadata"
            raise UserError(f"{d / name}: expected {text}, found {type(value).__name__}; not a rayq checkpoint file")


@dataclass
class LoadedModel:
    """A checkpoint's model, ready to score: on its device, in eval mode."""

    path: Path  # the step_N directory it came from
    step: int
    config: Config  # the checkpoint's own resolved config
    model: GPT


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A torch device from a config or flag value: `auto` (or None) is CUDA when present, else CPU."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: not a torch device (expected auto, cpu, cuda, cuda:N, xla)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(path: str | os.PathLike, device: str | torch.device | None = "auto") -> LoadedModel:
    """The model of a checkpoint dir, a run dir (its latest checkpoint) or its checkpoints/ dir,
    full or sharded, built from the checkpoint's own config.yaml and placed on `device`."""
    ckpt_dir = resolve_checkpoint(path)
    state = load(ckpt_dir, with_optimizer=False)
    cfg = state["config"]
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{ckpt_dir}: its weights do not match the model of its config.yaml "
                        f"({str(exc).splitlines()[0]})") from None
    model.to(resolve_device(device)).eval()
    return LoadedModel(ckpt_dir, int(state["trainer"].get("step", 0)), cfg, model)


def load_trainer(directory: str | os.PathLike) -> dict:
    return _load(Path(directory) / "trainer.pt")


def is_sharded(directory: str | os.PathLike) -> bool:
    """A sharded (DCP) checkpoint directory: `.metadata` instead of model.pt."""
    return (Path(directory) / ".metadata").is_file()


def load_config(directory: str | os.PathLike) -> Config:
    return config_io.resolve(config_file=Path(directory) / "config.yaml")


def list_steps(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed `step_N` directories, oldest first (staging and .old directories are ignored)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(checkpoints_dir: str | os.PathLike) -> Optional[Path]:
    steps = list_steps(checkpoints_dir)
    return steps[-1][1] if steps else None


def damage(directory: str | os.PathLike) -> Optional[str]:
    """Why a committed checkpoint cannot be resumed from (None: it looks whole). Cheap: it checks
    that every file is there and that each tensor file's zip index and the small files read,
    without reading the weights (a truncated or half-copied file fails here)."""
    d = Path(directory)
    sharded = is_sharded(d)
    needed = ["trainer.pt", "config.yaml"] + ([] if sharded else ["model.pt"])
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for f in [d / "model.pt", d / "optim.pt"] if not sharded else []:
        if f.exists() and not zipfile.is_zipfile(f):
            return f"{f.name} is truncated or not a tensor file"
    if sharded and not any(d.glob("*.distcp")):
        return "no .distcp shard files"
    try:
        trainer = _load(d / "trainer.pt")
        load_config(d)
    except UserError as exc:
        return str(exc)
    if not isinstance(trainer, dict) or "step" not in trainer:
        return "trainer.pt holds no step"
    return None


def newest_valid(checkpoints_dir: str | os.PathLike, *, say=None) -> Optional[Path]:
    """The newest committed checkpoint that is not damaged (`damage`); each damaged newer one is
    reported through `say` (skipped, not deleted: a later commit of that step replaces it)."""
    for _, path in reversed(list_steps(checkpoints_dir)):
        why = damage(path)
        if why is None:
            return path
        if say is not None:
            say(f"checkpoint {path} is damaged ({why}); falling back to an older one")
    return None


def prune(checkpoints_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all); also sweep abandoned staging dirs."""
    root = Path(checkpoints_dir)
    if keep > 0:
        for _, path in list_steps(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint dir, a run dir (latest checkpoint), or its checkpoints/ dir."""
    p = Path(path)
    if (p / "model.pt").exists() or is_sharded(p):
        return p
    for root in (p / "checkpoints", p):
        if (found := latest(root)) is not None:
            return found
    raise UserError(f"{p}: no checkpoint found (expected a step_N directory with model.pt or sharded .metadata)")


# ----------------------------------------------------------------------------- sharded (DCP) layout


def optim_ids_to_fqns(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A plain `optimizer.state_dict()` (params numbered in group order) keyed by parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {fqns[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in state["param_groups"]]}


def optim_fqns_to_ids(state: dict) -> dict:
    """The inverse: name-keyed optimizer state (DCP checkpoints) as a plain `optimizer.state_dict()`."""
    ids: dict[str, int] = {}
    for g in state["param_groups"]:
        for fqn in g["params"]:
            ids.setdefault(fqn, len(ids))
    return {"state": {ids[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [ids[f] for f in g["params"]]} for g in state["param_groups"]]}


def load_full_state_dict(directory: str | os.PathLike, *, with_optimizer: bool = False) -> dict:
    """A sharded checkpoint as full, unsharded tensors, without a process group:
    {"model": state dict, "optim": plain optimizer state dict or None}."""
    keys = {"model", "optim"} if with_optimizer else {"model"}
    state: dict = {}
    _load_state_dict(state, storage_reader=SafeFileSystemReader(directory),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    optim = state.get("optim")
    return {"model": state["model"], "optim": optim_fqns_to_ids(optim) if optim else None}
