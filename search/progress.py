"""rayq's own live view of a search: a compact trial table on stderr, from a Tune Callback.

Why not Tune's reporter: Ray 2.60's new output engine (on unless `RAY_AIR_NEW_OUTPUT=0`)
drops a passed `CLIReporter` ("AIR_VERBOSITY is set, ignoring passed-in ProgressReporter"),
prints its table to stdout (where `rayq search` prints results), shows whatever metrics it infers
and cannot tell a milestone stop from a completion (both end TERMINATED). `rayq search` therefore
runs Tune with `verbose=0` and this callback prints, to stderr:

- one line per trial event: an evaluation (objectives ± between-seed SE, seeds), a stop (the
  scheduler's reason, read from its state file), a completion, an error;
- the whole table (trial, recipe label, step, objectives, the step they were evaluated at,
  seeds, status) at most every `interval` seconds when something happened, and at the end.

Even with `verbose=0` Tune prints an experiment box and "View detailed results here" with
`print`, i.e. to stdout, which would corrupt `rayq search --json`: `fit_on_stderr` runs the fit
with the driver's stdout sent to stderr.

Status words are rayq's: `running`, `completed`, `stopped@<milestone>`, `diverged`, `error`.
Tune marks the report where the scheduler stopped a trial with `done=True` and a completed
trial's last report with `done=False`; this table (and results.parquet's readers) go by the
scheduler's decisions, not by that flag.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from ray.tune import Callback

from rayq.search import results as results_io
from rayq.search.objectives import as_float as _f

__all__ = ["ProgressTable", "TrialLine", "format_table", "fit_on_stderr"]


@dataclass
class TrialLine:
    number: int
    trial_id: str
    label: str
    step: Optional[int] = None
    values: dict[str, tuple[float, float]] = field(default_factory=dict)  # objective -> (value, seed SE)
    seeds: Optional[int] = None
    status: str = "running"
    evaluated_at: Optional[int] = None  # the step of the values (evaluations are sparser than reports)


def _short(name: str) -> str:
    """`ptq/w8a8-vectorwise/kl` -> `w8a8-vectorwise/kl` (the table is narrow)."""
    parts = name.split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else name


def _cell(value: float, se: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.4g}" + (f"±{se:.2g}" if math.isfinite(se) and se > 0 else "")


def format_table(lines: list[TrialLine], objectives: list[str]) -> str:
    header = ["#", "trial", "recipe", "step", *[_short(n) for n in objectives], "@eval", "seeds", "status"]
    rows = [header]
    for t in lines:
        rows.append([str(t.number), t.trial_id, t.label, "–" if t.step is None else str(t.step),
                     *[_cell(*t.values.get(n, (math.nan, math.nan))) for n in objectives],
                     "–" if t.evaluated_at is None else str(t.evaluated_at),
                     "–" if t.seeds is None else str(t.seeds), t.status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


class ProgressTable(Callback):
    """The live table (see the module docstring). `label(trial_config) -> str` names a recipe."""

    def __init__(self, objectives: list[str], total_steps: int, out_dir: str | Path,
                 label: Callable[[dict], str], *, interval: float = 30.0, stream: Optional[TextIO] = None):
        self.objectives = list(objectives)
        self.total_steps = int(total_steps)
        self.out_dir = Path(out_dir)
        self.label = label
        self.interval = float(interval)
        self._stream = stream
        self.lines: dict[str, TrialLine] = {}
        self._last_table = time.monotonic()
        self._changed = False  # the periodic table is printed only when something happened since the last

    def __getstate__(self) -> dict:
        # Tune pickles callbacks into the experiment state; a stream is not picklable
        return {**self.__dict__, "_stream": None}

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _line(self, trial: Any) -> TrialLine:
        tid = str(trial.trial_id)
        if tid not in self.lines:
            self.lines[tid] = TrialLine(len(self.lines) + 1, tid, self.label(dict(trial.config)))
        return self.lines[tid]

    def _decision(self, trial_id: str) -> Optional[dict]:
        stops = [d for d in results_io.read_decisions(self.out_dir)
                 if d.get("trial_id") == trial_id and d.get("action") == "STOP"]
        return stops[-1] if stops else None

    def _event(self, line: TrialLine, what: str) -> None:
        self._changed = True
        vals = ", ".join(f"{_short(n)} {_cell(*line.values[n])}" for n in self.objectives if n in line.values)
        seeds = f" ({line.seeds} seeds)" if line.seeds else ""
        self._print(f"[rayq search] #{line.number} {line.trial_id} {line.label} step {line.step}: {what}"
                    + (f" · {vals}{seeds}" if vals and what == "evaluated" else ""))

    # --------------------------------------------------------------------- Tune hooks

    def setup(self, **info):
        # Tune has set up the searcher by now, so an Optuna study kept in DIR/optuna.db exists
        from rayq.search.dashboards import optuna_line

        if (line := optuna_line(self.out_dir)) is not None:
            self._print(f"rayq search: {line}")

    def on_trial_start(self, iteration, trials, trial, **info):
        line = self._line(trial)
        line.status = "running"
        self._print(f"[rayq search] #{line.number} {line.trial_id} {line.label}: started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        line = self._line(trial)
        step = _f(result.get("step"))
        line.step = int(step) if math.isfinite(step) else line.step
        seeds = _f(result.get("seeds"))
        line.seeds = int(seeds) if math.isfinite(seeds) else line.seeds
        # a fresh evaluation carries the seed SE / held-out loss; other reports carry old values forward
        fresh = any(math.isfinite(_f(result.get(k))) for k in
                    [*(f"{n}_seed_se" for n in self.objectives), "eval/loss"])
        if fresh:
            for n in self.objectives:
                if math.isfinite(_f(result.get(n))):
                    line.values[n] = (_f(result[n]), _f(result.get(f"{n}_seed_se")))
            line.evaluated_at = line.step
            self._event(line, "evaluated")
        if _f(result.get("diverged")) >= 1:
            line.status = "diverged"
        if result.get("done"):
            self._stopped(line)

    def _stopped(self, line: TrialLine) -> None:
        d = self._decision(line.trial_id)
        if d is None:
            return
        if d.get("kind") == "diverged":
            line.status = "diverged"
        else:
            line.status = f"stopped@{d.get('milestone')}"
        reason = str(d.get("reason") or "")
        self._event(line, reason if reason.startswith(line.status.split("@")[0]) else f"{line.status} ({reason})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        line = self._line(trial)
        if line.status == "running":
            self._stopped(line)
        if line.status == "running":
            line.status = "completed" if (line.step or 0) >= self.total_steps else "ended early"
            self._event(line, line.status)

    def on_trial_error(self, iteration, trials, trial, **info):
        line = self._line(trial)
        line.status = "error"
        self._event(line, "error (see the trial's error.txt under the Tune directory)")

    def on_step_end(self, iteration, trials, **info):
        if self._changed and time.monotonic() - self._last_table >= self.interval:
            self.print_table()

    def on_experiment_end(self, trials, **info):
        if self.lines:
            self.print_table()

    def print_table(self) -> None:
        self._last_table, self._changed = time.monotonic(), False
        self._print(format_table(sorted(self.lines.values(), key=lambda t: t.number), self.objectives))


def fit_on_stderr(tuner: Any) -> Any:
    """`tuner.fit()` with anything Tune prints in this process going to stderr, not stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        return tuner.fit()
