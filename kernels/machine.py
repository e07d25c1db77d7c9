"""What machine this is, and a small on-disk cache of what was measured on it.

Kernel choices depend on the CPU (VNNI, AVX-512 BF16, AMX) and on the torch build, and the CPU
under this project changes between sessions. Probes (`rayq.kernels.backends`, the bf16 probe of
`rayq.precision`) therefore run once per machine and store their verdict in one JSON file per
machine key (CPU model + a hash of its flags + torch version) under `RAYQ_CACHE_DIR` or
`~/.cache/rayq`. The file is written atomically (temp name, fsync, rename); a file that does not
parse, or whose key does not match, is ignored and rewritten: a cache is never trusted blindly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from .files import atomic_write

CACHE_FORMAT = "rayq.kernels.probe/1"
# the flags that decide which integer / bf16 kernels oneDNN can use
_KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_fp16")
_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model, the kernel-relevant flags and a hash of all flags (from /proc/cpuinfo)."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
                if model and flags:
                    break
    except OSError:  # not Linux: the platform string is all there is
        pass
    model = model or platform.processor() or platform.machine()
    all_flags = sorted(set(flags))
    return {
        "model": model,
        "kernel_flags": [f for f in _KERNEL_FLAGS if f in all_flags],
        "flags_sha256": hashlib.sha256(" ".join(all_flags).encode()).hexdigest()[:16],
        "cores": os.cpu_count(),
    }


def machine_key() -> str:
    """Stable name of (CPU model, its flags, torch version): one cache file per key."""
    info = cpu_info()
    raw = f"{info['model']}|{info['flags_sha256']}|{torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    root = os.environ.get("RAYQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rayq")
    return Path(root)


def cache_path() -> Path:
    return cache_dir() / f"probe-{machine_key()}.json"


def _fresh() -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "key": machine_key(), "cpu": cpu_info(), "torch": torch.__version__, "entries": {}}


def _read() -> dict[str, Any]:
    """The cache document, or a fresh one when the file is absent, unreadable or not ours."""
    try:
        doc = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return _fresh()
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or doc.get("key") != machine_key() \
            or not isinstance(doc.get("entries"), dict):
        return _fresh()
    return doc


def lookup(name: str) -> Optional[dict[str, Any]]:
    """The stored entry `name` (a dict), or None. Callers validate its content before use."""
    entry = _read()["entries"].get(name)
    return entry if isinstance(entry, dict) else None


def store(name: str, entry: dict[str, Any]) -> None:
    """Record `entry` under `name`, atomically; an unwritable cache directory only costs a re-probe."""
    with _lock:
        doc = _read()
        doc["entries"][name] = entry
        path = cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: json.dump(doc, f, indent=1, sort_keys=True), binary=False)
        except OSError:
            pass


def describe() -> dict[str, Any]:
    """What every bench JSON records about the machine (the one place that reads the CPU for
    benchmarks), with the load average at the call: a shared machine slows every figure."""
    return {**cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(), "probe_cache": str(cache_path()),
            "load_average": list(os.getloadavg())}
