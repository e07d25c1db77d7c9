"""Progress and log lines on stderr (results go to stdout; see DESIGN.md, "Command line").

    say("preparing data: training the tokenizer")
    progress_line(120, 900, loss=4.21, tokens_per_s=5300, elapsed_s=47)
    # -> "step 120/900 · loss 4.21 · 5.3k tok/s · eta 5m"
"""

from __future__ import annotations

import math
import sys
from typing import Optional, TextIO

__all__ = ["say", "progress_line", "human_count", "human_duration"]


def say(message: str, *, prefix: str = "", stream: Optional[TextIO] = None) -> None:
    """One progress or log line on stderr, flushed at once (a long step must not hide it)."""
    print(f"{prefix}{message}", file=stream or sys.stderr, flush=True)


def human_count(value: float) -> str:
    """5300 -> "5.3k", 2_400_000 -> "2.4M"; small values keep up to three significant digits."""
    if not math.isfinite(value):
        return str(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def human_duration(seconds: float) -> str:
    """75 -> "1m15s", 3 hours -> "3h0m"; seconds below a minute are whole seconds."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60}m"


def progress_line(
    step: int,
    total: int,
    *,
    loss: Optional[float] = None,
    tokens_per_s: Optional[float] = None,
    elapsed_s: Optional[float] = None,
) -> str:
    """`step 120/900 · loss 4.21 · 5.3k tok/s · eta 6m`; the ETA assumes the pace so far holds."""
    parts = [f"step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}" if math.isfinite(loss) else f"loss {loss}")
    if tokens_per_s is not None:
        parts.append(f"{human_count(tokens_per_s)} tok/s")
    if elapsed_s is not None and step > 0:
        parts.append(f"eta {human_duration(elapsed_s / step * max(total - step, 0))}")
    return " · ".join(parts)
