"""What a run directory may be reused for, and its metrics file.

A run directory holds `config.yaml`, `metrics.jsonl` and `checkpoints/step_N/` (each checkpoint
with its own `config.yaml`). Rerunning `rayq train` into it is one of:

- fresh:    nothing there yet;
- resume:   the same config; training continues from the newest valid checkpoint;
- extend:   the same config except a higher `recipe.steps` (a finished run trained further);
- finished: the same config and the newest checkpoint is already at `recipe.steps`.

Anything else is refused (another config's checkpoints would be resumed into this one). The
config compared against is the newest checkpoint's own `config.yaml` (what the weights were
trained with) and the directory's `config.yaml`, so a missing or hand-edited top-level file
cannot mix two runs.

`metrics.jsonl` holds one JSON object per report, strictly valid JSON (non-finite numbers are
written as null), and never repeats a step: a report at a step at or before the last line's
(a resumed run re-reaching steps it reported before being killed) first drops those lines.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rayq import checkpoint as ckpt_io
from rayq import config as config_io
from rayq.errors import UserError
from rayq.fs import os_error_message
from rayq.schema import Config

__all__ = ["Reuse", "check_reuse", "make_run_dir", "json_safe", "dumps", "append_metrics", "read_metrics",
           "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
_TAIL_BYTES = 1 << 16  # enough for the last report line (a few hundred metrics at most)


# ----------------------------------------------------------------------------- the directory itself


def make_run_dir(out: str | os.PathLike) -> Path:
    """Create `out` (a run directory) or check an existing one is a writable directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory; give a run directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {os_error_message(exc, out, 'the run directory')}") from None
    if not os.access(out, os.W_OK | os.X_OK):  # also false on a read-only filesystem, even for root
        ro = _read_only(out)
        raise UserError(f"--out {out}: " + ("read-only filesystem" if ro else "not writable")
                        + "; give a run directory on a writable disk")
    return out


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ----------------------------------------------------------------------------- reuse


@dataclass(frozen=True)
class Reuse:
    """What rerunning `cfg` into a run directory does (see the module docstring)."""

    kind: str  # fresh | resume | extend | finished
    step: int = 0  # the newest valid checkpoint's step (0 when none)
    previous_steps: Optional[int] = None  # recipe.steps of the run found there

    def describe(self, out: Path, cfg: Config) -> str:
        if self.kind == "finished":
            return f"{out} is already at step {self.step} (recipe.steps={cfg.recipe.steps}); nothing to train"
        if self.kind == "extend":
            return (f"extending {out} from recipe.steps={self.previous_steps} to {cfg.recipe.steps}, "
                    f"resuming at step {self.step}")
        if self.kind == "resume":
            return f"resuming {out} at step {self.step} of {cfg.recipe.steps}"
        return f"training into {out}"


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, path + ".")
        elif va != vb:
            out.append(path)
    return out


def _saved_configs(out: Path, newest: Optional[Path]) -> list[tuple[str, Config]]:
    """(where, config) of the run found in `out`: the newest valid checkpoint's own and RUN/config.yaml."""
    found = []
    if newest is not None:
        found.append((str(newest / "config.yaml"), ckpt_io.load_config(newest)))
    if (out / "config.yaml").is_file():
        found.append((str(out / "config.yaml"), config_io.resolve(config_file=out / "config.yaml")))
    return found


def check_reuse(out: str | os.PathLike, cfg: Config) -> Reuse:
    """Whether `cfg` may train into `out`, and how; a `UserError` naming what differs if not."""
    out = Path(out)
    newest = ckpt_io.newest_valid(out / "checkpoints")  # what a resume would start from
    saved = _saved_configs(out, newest)
    if not saved:
        return Reuse("fresh")
    mine = config_io.to_dict(cfg)
    previous_steps = None
    for where, previous in saved:
        if config_io.config_hash(previous) == config_io.config_hash(cfg):
            continue
        diff = config_differences(config_io.to_dict(previous), mine)
        if diff == ["recipe.steps"] and cfg.recipe.steps > previous.recipe.steps:
            previous_steps = max(previous_steps or 0, previous.recipe.steps)
            continue
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise UserError(f"{out}: holds a run of a different config ({shown} differ from {where}); "
                        f"use a new --out (or --config {where} to resume it)")
    step = 0 if newest is None else int(newest.name.removeprefix("step_"))
    if step >= cfg.recipe.steps:
        return Reuse("finished", step, previous_steps)
    if previous_steps is not None:
        return Reuse("extend", step, previous_steps)
    return Reuse("resume" if step else "fresh", step)


# ----------------------------------------------------------------------------- metrics.jsonl


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None and numpy/torch scalars as Python numbers: what
    strict JSON (and every reader that is not Python's json module) accepts."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes bare NaN/Infinity (they become null)."""
    return json.dumps(json_safe(value), allow_nan=False, default=str, **kwargs)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every report of `<run_dir>/metrics.jsonl` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _last_step(path: Path) -> Optional[int]:
    """The step of the last complete line of a metrics file (read from its tail only)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - _TAIL_BYTES))
        lines = fh.read().splitlines()
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step") if isinstance(row, dict) else None
        return int(step) if isinstance(step, (int, float)) and math.isfinite(step) else None
    return None


def append_metrics(run_dir: str | os.PathLike, metrics: dict) -> None:
    """Append one report to `<run_dir>/metrics.jsonl`. A report at a step at or before the last
    line's first drops the lines from that step on (atomic rewrite), so a resumed run never leaves
    a step twice; one line is one write of a complete line, so a killed run leaves whole lines."""
    path = Path(run_dir) / METRICS_FILE
    line = dumps(metrics) + "\n"
    step = metrics.get("step")
    if isinstance(step, (int, float)) and path.is_file():
        last = _last_step(path)
        if last is not None and step <= last:
            keep = [r for r in read_metrics(run_dir) if not (isinstance(r.get("step"), (int, float)) and r["step"] >= step)]
            config_io.atomic_write_text(path, "".join(dumps(r) + "\n" for r in keep))
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError as exc:
        raise UserError(os_error_message(exc, path, "metrics")) from None
