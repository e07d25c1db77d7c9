"""The results of a search: every report of every trial in `DIR/results.parquet`, the final
front in `DIR/pareto.csv`.

`ResultsWriter` (in tuner.py, the module that imports ray) is a Ray Tune callback on the driver:
each trial result becomes one row (`trial_id`, `recipe_id`, the trial's recipe values as
`config/<path>`, every reported metric, each seed's checkpoint as `checkpoint_path/seed<k>`), and
the table is rewritten atomically (temporary file + rename) as the search runs, at most every few
seconds and at every trial end, so a killed driver leaves the last complete table. On resume
the existing rows are kept. A trial's status is derived, never stored twice: `diverged` if it
reported a divergence, `stopped` if the scheduler stopped it (its decisions are read from the
scheduler's state file, with the milestone where it stopped), `completed` if it reached
`recipe.steps`, otherwise `incomplete`. Only completed trials can reach the Pareto front.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rayq.config import atomic_write_bytes, atomic_write_text
from rayq.errors import UserError
from rayq.search.pareto import pareto_front

RESULTS = "results.parquet"
PARETO = "pareto.csv"
SCHEDULER_STATE = "scheduler_state.json"
FLUSH_SECONDS = 3.0


def clean(value: Any) -> Any:
    """Parquet-friendly scalars: numbers as float (except booleans as 0/1), the rest as str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def result_row(trial_id: str, config_cols: dict, result: dict) -> dict:
    """One results row: the trial, its `config/<path>` columns (`tuner.config_columns`), then the
    reported metrics."""
    row: dict[str, Any] = {"trial_id": trial_id, "recipe_id": trial_id, "time": time.time(), **config_cols}
    for key, value in result.items():
        if key in ("config", "trial_id") or isinstance(value, dict):
            continue
        row[key] = clean(value)
    return row


def write_table(rows: Sequence[dict], path: Path) -> None:
    """Write rows to Parquet atomically (all columns nullable; missing keys are nulls)."""
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    data = {key: [row.get(key) for row in rows] for key in columns}
    arrays = {}
    for key, values in data.items():
        if all(v is None or isinstance(v, float) for v in values):
            arrays[key] = pa.array(values, type=pa.float64())
        else:
            arrays[key] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    table = pa.table(arrays)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


REQUIRED_COLUMNS = ("trial_id", "step")  # what every row of a search's results has


def read_rows(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / RESULTS
    if not path.exists():
        raise UserError(f"{path}: no results here (expected the --out directory of a rayq search)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: unreadable Parquet file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: not a rayq results table (no {missing[0]!r} column)")
    return table.to_pylist()


def read_decisions(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / SCHEDULER_STATE
    if not path.exists():
        return []
    try:
        state = json.loads(path.read_text())
        decisions = state.get("decisions", [])
        if not isinstance(decisions, list) or not all(isinstance(d, dict) for d in decisions):
            raise ValueError("'decisions' is not a list of objects")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: damaged scheduler state ({exc})") from None
    return list(decisions)


def trial_status(rows: Sequence[dict], decisions: Sequence[dict], total_steps: int) -> dict[str, dict]:
    """trial_id -> {status, stopped_at, last (the last row), steps}."""
    stops = {d["trial_id"]: d for d in decisions if d.get("action") == "STOP"}
    by_trial: dict[str, list[dict]] = {}
    for row in rows:
        by_trial.setdefault(row["trial_id"], []).append(row)
    out = {}
    for tid, trial_rows in by_trial.items():
        trial_rows = sorted(trial_rows, key=lambda r: (r.get("step") or 0, r.get("time") or 0))
        last = trial_rows[-1]
        diverged = any((r.get("diverged") or 0) >= 1 for r in trial_rows)
        decision = stops.get(tid)
        if diverged or (decision and decision.get("kind") == "diverged"):
            status, stopped_at = "diverged", None
        elif decision is not None:
            status, stopped_at = "stopped", decision.get("milestone")
        elif (last.get("step") or 0) >= (last.get("config/recipe.steps") or total_steps):  # a searched steps is its own
            status, stopped_at = "completed", None
        else:
            status, stopped_at = "incomplete", None
        out[tid] = {"status": status, "stopped_at": stopped_at, "last": last, "reports": len(trial_rows),
                    "reason": decision.get("reason") if decision else None}
    return out


def front_rows(rows: Sequence[dict], decisions: Sequence[dict], total_steps: int, objectives: Sequence[Any],
               constraints: Sequence[Any] = ()) -> list[dict]:
    """The Pareto front of completed, feasible trials (last report of each), best first."""
    status = trial_status(rows, decisions, total_steps)
    done = [s["last"] for s in status.values() if s["status"] == "completed"]
    done = [r for r in done if all(c.satisfied(r) for c in constraints)]
    if not done:
        return []
    return [done[i] for i in pareto_front(done, objectives)]


def write_pareto(front: Sequence[dict], objectives: Sequence[Any], path: Path) -> None:
    names = [o.name for o in objectives]
    config_cols = sorted({k for r in front for k in r if k.startswith("config/")})
    extra = [f"{n}_seed_se" for n in names] + ["step", "checkpoint_path"]
    header = ["trial_id", *config_cols, *names, *extra]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in front:
        writer.writerow(["" if r.get(h) is None else r.get(h) for h in header])
    atomic_write_text(path, buf.getvalue())


def finite(value: Optional[float]) -> bool:
    return value is not None and isinstance(value, float) and math.isfinite(value)
