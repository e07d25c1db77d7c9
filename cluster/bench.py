"""`rayq bench train`: tokens/s of the one train loop in-process and on a 1-worker Ray Train run,
the Ray overhead with a breakdown, a bare PyTorch loop as the floor, and bf16 vs fp32.

The machines this runs on are shared and drift by tens of percent within minutes, so the Ray
overhead comes from interleaved rounds, each of them:

1. the loop in-process, no Ray running: in the main thread (what `rayq train` does), then in a
   second thread (what Ray Train does: the overhead is measured against this one, see
   `_local_in_thread`);
2. the embedded Ray started (`rayq.cluster.trainer.connect`, the same cluster `rayq train` uses);
3. the loop in-process beside the idle cluster (what idle Ray daemons cost a neighbour);
4. the loop on a 1-worker TorchTrainer (`rayq.cluster.trainer.fit`, what `rayq train --workers 1`
   runs), while the CPU time of every process this benchmark started is sampled from /proc;
5. Ray stopped.

Overhead of a round = 1 - ray / local; the reported figure is the median over rounds. Two rates
per run, both steady-state (the first report, which holds warm-up, is dropped): `step` is the
loop's own `train/tokens_per_s` (time inside training steps), `wall` counts the tokens between
the first kept and the last report over the wall-clock between them, so whatever happens between
steps (reporting to Ray, a stalled RPC) is in it. Wall is the figure the target is about.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

Say = Callable[[str], None]


# ============================================================================ CPU time per process


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every process in /proc (one that exits meanwhile is skipped)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    out[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _raylet_pid_of(pid: int) -> Optional[int]:
    """RAY_RAYLET_PID from a process's environment: Ray's workers are detached from the raylet
    that starts them (not its children), but carry its pid."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for item in fh.read().split(b"\0"):
                if item.startswith(b"RAY_RAYLET_PID="):
                    return int(item.split(b"=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def _proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):  # Ray names its workers' processes after the actor or task
        return first.split()[0]
    return os.path.basename(first) if first else "?"


def _cpu_seconds(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class CpuSampler:
    """CPU seconds of this process and every process it started (the embedded Ray's daemons and
    workers), sampled in a thread; `usage()` gives each process name's share of one core."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._first: dict[int, tuple[str, float]] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._mine: set[int] = set()
        self._foreign: set[int] = set()  # not ours: never read their environment again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rayq-bench-cpu-sampler")
        self._t0 = self._t1 = 0.0

    def _sample(self) -> None:
        """This process's descendants (driver, raylet, gcs, agents) and the workers of a raylet
        among them; a process is classified once, its name re-read (workers rename themselves
        from ray::IDLE to their actor's name)."""
        parents = process_parents()
        mine = {os.getpid()} | (self._mine & parents.keys())
        grew = True
        while grew:  # descendants, whatever the order of their pids
            before = len(mine)
            mine |= {pid for pid, ppid in parents.items() if ppid in mine}
            grew = len(mine) > before
        for pid in parents.keys() - mine - self._foreign:
            if _raylet_pid_of(pid) in mine:
                mine.add(pid)
            else:
                self._foreign.add(pid)
        self._mine |= mine
        for pid in mine:
            secs = _cpu_seconds(pid)
            if secs is not None:
                self._first.setdefault(pid, ("?", secs))
                name = "driver (rayq bench)" if pid == os.getpid() else _proc_name(pid)
                if name == "?" and pid in self._last:  # an exiting process (zombie) has no cmdline left
                    name = self._last[pid][0]
                self._last[pid] = (name, secs)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuSampler":
        self._t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._t1 = time.perf_counter()

    def usage(self) -> dict[str, float]:
        """Percent of one core per process name over the sampled window (largest first)."""
        span = max(self._t1 - self._t0, 1e-9)
        by_name: dict[str, float] = {}
        for pid, (name, last) in self._last.items():
            by_name[name] = by_name.get(name, 0.0) + last - self._first[pid][1]
        return {n: round(100 * s / span, 1) for n, s in sorted(by_name.items(), key=lambda kv: -kv[1]) if s > 0}


# ============================================================================ the runs


def _bare_loop(cfg, data, steps: int, device: str) -> float:
    """tokens/s of a minimal fp32 PyTorch loop on the same model, batches and optimizer."""
    import torch

    from rayq import batches as batches_io
    from rayq.train import build_model, build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, torch.device(device))
    opt = build_optimizer(model, cfg.recipe)
    batches = batches_io.train_batches(data, cfg.recipe.batch_size, cfg.model.seq_len, seed=cfg.train.seed)
    rates = []
    for i in range(steps):
        t0 = time.perf_counter()
        x, y = (t.to(device) for t in next(batches))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # a sync on CUDA too
        if i >= 2:
            rates.append(x.numel() / (time.perf_counter() - t0))
    return statistics.median(rates)


def rates(history: list[dict], tokens_per_step: int) -> dict:
    """Steady-state tokens/s of one run from its reports: `step` (the loop's own figure) and
    `wall` (tokens over wall-clock between the first kept and the last report)."""
    rows = [m for m in history if "train/tokens_per_s" in m][1:]
    out = {"step": statistics.median(m["train/tokens_per_s"] for m in rows) if rows else float("nan"),
           "wall": float("nan")}
    timed = [m for m in rows if "train/wall_time" in m]
    if len(timed) >= 2 and timed[-1]["train/wall_time"] > timed[0]["train/wall_time"]:
        tokens = (timed[-1]["step"] - timed[0]["step"]) * tokens_per_step
        out["wall"] = tokens / (timed[-1]["train/wall_time"] - timed[0]["train/wall_time"])
    return out


def _local(cfg, data, device: Optional[str] = None) -> list[dict]:
    from rayq.train import LocalReporter, run

    class WallClock(LocalReporter):
        """The run directory's reporter, keeping each report stamped with the wall clock (as the
        Ray reporter stamps its own), so both runs' wall rates are measured the same way."""

        rows: list[dict] = []

        def report(self, metrics: dict, checkpoint: Optional[Path] = None) -> Optional[Path]:
            self.rows.append({**metrics, "train/wall_time": time.time()})
            return super().report(self.rows[-1], checkpoint)

    with tempfile.TemporaryDirectory() as d:
        reporter = WallClock(d, cfg, echo=False)
        reporter.rows = []
        run(cfg, reporter, data=data, device=device)
        return reporter.rows


def _local_in_thread(cfg, data, device: Optional[str] = None) -> list[dict]:
    """`_local` in a second thread of this process: Ray Train V2 runs the train function in a
    thread of its worker (not the main thread), and on a loaded machine torch's OpenMP team
    behaves very differently from the two (measured here at load 25-60 on 2 cores: the tiny loop
    with 2 threads ran 10-20x faster in a second thread than in the main thread). Comparing
    like with like, the overhead is Ray's and not the calling thread's."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["rows"] = _local(cfg, data, device)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out["error"] = exc

    thread = threading.Thread(target=target, name="rayq-bench-local")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["rows"]


def _ray(cfg) -> tuple[list[dict], dict[str, float]]:
    from rayq.cluster.trainer import fit

    with tempfile.TemporaryDirectory() as d, CpuSampler() as sampler:
        fit(cfg, Path(d) / "run", evaluate=False)
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    return rows, sampler.usage()


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _ray_with_defaults(cfg) -> tuple[list[dict], dict[str, float]]:
    """The Ray Train run on an embedded cluster started with Ray's own settings (workers at nice
    15, metrics collection on) instead of rayq's `EMBEDDED_SYSTEM_CONFIG`: the comparison."""
    import ray

    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        return _ray(cfg)
    finally:
        ray.shutdown()


def ray_rounds(cfg, data, rounds: int, say: Say, with_defaults: bool = False) -> dict:
    """The interleaved local / idle-Ray / Ray Train rounds (module docstring) and their medians;
    `with_defaults` adds a Ray Train run on a cluster with Ray's default settings to each round."""
    import ray

    from rayq.cluster.trainer import connect

    tokens = cfg.recipe.batch_size * cfg.model.seq_len
    device = "cuda" if cfg.cluster.device == "gpu" else "cpu"
    out_rounds = []
    for r in range(1, rounds + 1):
        if ray.is_initialized():
            raise RuntimeError("bench train: Ray is already running in this process; the rounds start and stop it")
        say(f"round {r}/{rounds}: loop in-process (main thread), no Ray")
        local_main = rates(_local(cfg, data, device), tokens)
        say(f"round {r}/{rounds}: loop in-process (a second thread, as Ray Train runs it), no Ray")
        local = rates(_local_in_thread(cfg, data, device), tokens)
        say(f"round {r}/{rounds}: starting the embedded Ray")
        connect(None, num_cpus=max(2, os.cpu_count() or 1))
        try:
            say(f"round {r}/{rounds}: loop in-process beside the idle Ray")
            idle = rates(_local_in_thread(cfg, data, device), tokens)
            say(f"round {r}/{rounds}: loop on Ray Train, 1 worker")
            rows, cpu = _ray(cfg)
        finally:
            ray.shutdown()
        on_ray = rates(rows, tokens)
        defaults = None
        if with_defaults:
            say(f"round {r}/{rounds}: loop on Ray Train, 1 worker, Ray's default cluster settings")
            rows_d, cpu_d = _ray_with_defaults(cfg)
            defaults = {"ray_tokens_per_s": rates(rows_d, tokens), "cpu_pct_of_one_core": cpu_d,
                        "worker_niceness": rows_d[0].get("ray/niceness") if rows_d else None}
            defaults["ray_overhead_pct"] = {k: 100 * (1 - defaults["ray_tokens_per_s"][k] / local[k])
                                            for k in ("step", "wall")}
        reports = [m for m in rows if "ray/report_seconds" in m]
        span = reports[-1]["train/wall_time"] - reports[0]["train/wall_time"] if len(reports) >= 2 else 0.0
        report_share = ((reports[-1]["ray/report_seconds"] - reports[0]["ray/report_seconds"]) / span
                        if span > 0 else float("nan"))
        first = rows[0] if rows else {}
        out_rounds.append({
            "local_tokens_per_s": local, "local_main_thread_tokens_per_s": local_main,
            "idle_ray_local_tokens_per_s": idle, "ray_tokens_per_s": on_ray,
            "ray_overhead_pct": {k: 100 * (1 - on_ray[k] / local[k]) for k in ("step", "wall")},
            "idle_ray_cost_pct": {k: 100 * (1 - idle[k] / local[k]) for k in ("step", "wall")},
            "reporting_pct_of_wall": 100 * report_share,
            "reports": len(reports),
            "worker_torch_threads": first.get("ray/torch_threads"),
            "worker_niceness": first.get("ray/niceness"),
            "cpu_pct_of_one_core": cpu,
            "loadavg": list(os.getloadavg()),
            **({"ray_default_settings": defaults} if defaults else {}),
        })
        say(f"round {r}/{rounds}: local {local['wall']:.0f} tok/s, Ray {on_ray['wall']:.0f} tok/s "
            f"(overhead {out_rounds[-1]['ray_overhead_pct']['wall']:.1f}%), idle Ray costs "
            f"{out_rounds[-1]['idle_ray_cost_pct']['wall']:.1f}%")

    def med(key: str, kind: str) -> float:
        return _median([x[key][kind] for x in out_rounds])

    return {
        "rounds": out_rounds,
        "local_tokens_per_s": med("local_tokens_per_s", "wall"),
        "ray_tokens_per_s": med("ray_tokens_per_s", "wall"),
        "ray_overhead_pct": med("ray_overhead_pct", "wall"),
        "ray_overhead_step_pct": med("ray_overhead_pct", "step"),
        "local_main_thread_tokens_per_s": med("local_main_thread_tokens_per_s", "wall"),
        "idle_ray_cost_pct": med("idle_ray_cost_pct", "wall"),
        "reporting_pct_of_wall": _median([x["reporting_pct_of_wall"] for x in out_rounds]),
        # every process of the cluster but the worker and the driver (whose loop is idle then):
        # what Ray's daemons and helper actors take from the cores the worker trains on
        "daemons_cpu_pct_of_one_core": _median([
            sum(v for k, v in x["cpu_pct_of_one_core"].items()
                if not k.startswith(("ray::RayTrainWorker", "driver"))) for x in out_rounds]),
        "worker_cpu_pct_of_one_core": _median([x["cpu_pct_of_one_core"].get("ray::RayTrainWorker", float("nan"))
                                               for x in out_rounds]),
        **({"ray_default_settings_overhead_pct": _median([x["ray_default_settings"]["ray_overhead_pct"]["wall"]
                                                          for x in out_rounds])} if with_defaults else {}),
    }


# ============================================================================ the command


def main(argv: list[str]) -> int:
    from rayq.commands import add_config_args, make_parser, parse_args

    parser = make_parser("rayq bench train", "tokens/s: Ray Train vs the loop in-process (interleaved rounds), "
                                             "a bare loop, bf16 vs fp32")
    add_config_args(parser, shortcuts=())
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved local/Ray rounds (default 3; the median is reported)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the loop and the Ray Train worker on one GPU (NCCL)")
    parser.add_argument("--ray-defaults", action="store_true",
                        help="also run Ray Train on a cluster with Ray's default settings in every round (comparison)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, few steps, no Ray (a smoke test)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train rounds")
    parser.add_argument("--no-precision", action="store_true",
                        help="skip the bf16 native/emulated and emulated-fp16 (eager/fused rounding) runs")
    parser.add_argument("--json", action="store_true")
    args = parse_args(parser, argv)
    import torch

    from rayq import config as config_io
    from rayq import data as data_io
    from rayq.allocator import describe, keep_pages
    from rayq.cluster.bench_precision import precision_report
    from rayq.errors import UserError
    from rayq.kernels import machine

    if args.steps < 4:
        raise UserError(f"--steps={args.steps}: expected >= 4 (the first report is warm-up)")
    if args.rounds < 1:
        raise UserError(f"--rounds={args.rounds}: expected >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here (a CPU build of torch, or no GPU)")
    keep_pages()
    if args.preset is None and args.config is None:
        args.preset = "tiny" if args.quick else "small"
    steps = 8 if args.quick else args.steps
    threads = torch.get_num_threads()
    gpu = args.device == "cuda"
    cfg = config_io.resolve(preset=args.preset, config_file=args.config, overrides=args.overrides, values={
        "recipe.steps": steps, "train.log_every": max(2, steps // 8), "train.eval_every": 0,
        "train.checkpoint_every": 0, "recipe.precision": "fp32", "cluster.workers": 1,
        "cluster.cpus_per_worker": float(threads), "train.threads": threads, "train.device": args.device,
        "cluster.device": "gpu" if gpu else "cpu", "cluster.gpus_per_worker": 1.0 if gpu else 0.0})

    def say(msg: str) -> None:
        print(f"[bench train] {msg}", file=sys.stderr, flush=True)

    data = data_io.prepare(cfg.data, cfg.model.vocab_size, progress=say)
    tokens = cfg.recipe.batch_size * cfg.model.seq_len
    out: dict = {"preset": args.preset, "device": args.device, "steps": steps, "threads": threads,
                 "machine": machine.describe(), **describe(), "tokens_per_step": tokens}
    if gpu:
        out["gpu"] = torch.cuda.get_device_name(0)
    say(f"bare PyTorch loop (fp32, {args.device})")
    out["bare_fp32_tokens_per_s"] = _bare_loop(cfg, data, steps, args.device)
    say(f"rayq loop without Ray (fp32, {args.device})")
    out["rayq_fp32_tokens_per_s"] = rates(_local(cfg, data, args.device), tokens)["step"]
    say(f"rayq loop without Ray (bf16 autocast, {args.device})")
    bf16 = config_io.with_values(cfg, {"recipe.precision": "bf16"})
    out["rayq_bf16_tokens_per_s"] = rates(_local(bf16, data, args.device), tokens)["step"]
    out["loop_overhead_vs_bare"] = 1 - out["rayq_fp32_tokens_per_s"] / out["bare_fp32_tokens_per_s"]
    out["bf16_speedup_vs_fp32"] = out["rayq_bf16_tokens_per_s"] / out["rayq_fp32_tokens_per_s"]
    if not (args.quick or args.no_ray):
        out["ray"] = ray_rounds(cfg, data, args.rounds, say, with_defaults=args.ray_defaults)
        out["ray_overhead_pct"] = out["ray"]["ray_overhead_pct"]
        out["ray_target_met"] = out["ray_overhead_pct"] <= 5.0
    if not args.no_precision and not gpu:
        out["precision"] = precision_report(cfg, data, out["rayq_fp32_tokens_per_s"], say,
                                            lambda c, d: rates(_local(c, d), tokens)["step"], fused=not args.quick)
    out["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=None if args.json else 1))
    return 0
