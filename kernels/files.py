"""Files the kernels write (the probe cache, quantized checkpoints): whole or not at all, with the
permissions the user's umask gives. The core's writers (`rayq.config`, `rayq.fs`) use the same
umask reading, so every file rayq writes gets the mode a plain `open(path, "w")` would.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["current_umask", "file_mode", "atomic_write"]

_UMASK_LINE = re.compile(r"^Umask:\s*([0-7]+)$", re.MULTILINE)


def current_umask() -> int:
    """The process umask. Read from /proc where it exists: setting it to read it back (the only
    portable way) would briefly change it for every other thread of the process."""
    try:
        found = _UMASK_LINE.search(Path("/proc/self/status").read_text())
    except OSError:
        found = None
    if found:
        return int(found.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """`write(fh)` into a temporary file beside `path`, fsync it, give it the umask's mode (mkstemp
    makes 0600) and rename it into place: a reader sees the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
