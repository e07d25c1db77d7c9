"""A real multi-node run on one machine: a head node and trainer nodes as separate `ray start`
processes on 127.0.0.1, a `rayq search --address` that places training and evaluation by custom
resources, and a trainer node killed mid-trial (the trial resumes from its checkpoint on a
replacement node).

Layout (every node has its own --temp-dir, so its sockets and its processes are its own):
  head     --num-cpus 2 --resources {"evaluator": 2}: GCS, the trial drivers (and the Train
           controllers pinned beside them), the evaluator tasks (`eval.placement: task`)
  trainer  --num-cpus 0 --resources {"trainer": 2}: only the Ray Train workers can land here
           (`resources_per_worker: {CPU: 0, trainer: 1}`); no CPU, so no trial driver or
           evaluator task can, and killing it hits training only.

Ray rewrites a loopback --node-ip-address to the machine's routable IP ("so other machines can
reach it"); the nodes are started through a wrapper that keeps 127.0.0.1, and the driver runs
with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes it resolve its own address as 127.0.0.1.
Ray's gRPC servers still listen on all interfaces (not configurable in 2.60); every address
used is 127.0.0.1. Token auth is off in every process (RAY_AUTH_MODE=disabled). The test kills
only the processes of its own nodes (their process trees and anything naming their temp dirs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayq import config as config_io
from rayq.cluster.bench import process_parents

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PY = sys.executable
RAYQ = str(Path(sys.executable).with_name("rayq"))
STEPS = 20
BUDGET_S = 420  # ~3.5 min on 2 vCPUs; room for a loaded machine

# `ray start`, but a loopback --node-ip-address stays loopback (Ray would swap in eth0's IP)
RAY_START = ("import ray._private.services as s; "
             "_r = s.resolve_ip_for_localhost; "
             "s.resolve_ip_for_localhost = lambda h: h if h == '127.0.0.1' else _r(h); "
             "from ray.scripts.scripts import main; main()")


def _env(**extra) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tree(root: int) -> set[int]:
    ppid = process_parents()
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, pp in ppid.items():
            if pp == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return {p for p in found if p in ppid}


class Node:
    """One `ray start --block` process (own session and temp dir) and everything it spawns."""

    def __init__(self, name: str, temp_dir: Path, args: list[str], log: Path):
        self.name, self.temp_dir = name, str(temp_dir)
        temp_dir.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [PY, "-c", RAY_START, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir,
             "--disable-usage-stats", *args],
            env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> set[int]:
        own = {int(p) for p in os.listdir("/proc") if p.isdigit() and f"{self.temp_dir}/" in _cmdline(int(p))}
        return _tree(self.proc.pid) | own

    def node_id(self, timeout: float = 90) -> str:
        """The raylet's node id (from its command line), once the raylet is up."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"{self.name}: ray start exited with {self.proc.returncode}"
            for pid in self.pids():
                cmd = _cmdline(pid)
                if "/raylet/raylet " in cmd and "--node_id=" in cmd:
                    return cmd.split("--node_id=", 1)[1].split()[0]
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: no raylet after {timeout}s")

    def kill(self) -> None:
        """SIGKILL every process of this node (as if the machine went away)."""
        for _ in range(20):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.proc.wait(timeout=30)

    def stop(self, grace: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops its node's processes on SIGTERM
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class LoopbackCluster:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def start(self, name: str, args: list[str]) -> Node:
        # fixed agent ports: with port 0 the raylet waits for the agents to write their port files,
        # and gives up (a fatal check) when a loaded machine starts them slowly
        ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "runtime-env-agent-port", "metrics-export-port")]
        node = Node(name, self.root / name, [*args, *ports], self.root / f"{name}.log")
        self.nodes.append(node)
        return node

    def head(self, resources: dict) -> Node:
        return self.start("h", ["--head", "--port", str(self.port), "--num-cpus", "2", "--include-dashboard=false",
                                "--resources", json.dumps(resources)])

    def worker(self, name: str, resources: dict, num_cpus: int = 0) -> Node:
        return self.start(name, ["--address", self.address, "--num-cpus", str(num_cpus),
                                 "--resources", json.dumps(resources)])

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        code = ("import ray, time\nray.init(address=%r, logging_level='ERROR')\n"
                "while sum(n['Alive'] for n in ray.nodes()) < %d: time.sleep(0.5)\n") % (self.address, count)
        subprocess.run([PY, "-c", code], env=_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), timeout=timeout,
                       check=True, capture_output=True)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


@pytest.fixture
def cluster():
    # a short root: Ray's Unix sockets live under <temp-dir>/session_*/sockets (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="rqmn-", dir="/tmp"))
    c = LoopbackCluster(root)
    try:
        yield c
    finally:
        c.stop()
        leftovers = [p for p in (int(x) for x in os.listdir("/proc") if x.isdigit()) if f"{root}/" in _cmdline(p)]
        shutil.rmtree(root, ignore_errors=True)  # the nodes' session dirs and the shared storage
        assert not leftovers, f"Ray processes of the test cluster survived teardown: {leftovers}"


def _config(tiny_cfg, path: Path, storage: Path) -> Path:
    points = [{"recipe.weight_decay": wd} for wd in (0.1, 0.01)]
    cfg = config_io.with_values(tiny_cfg, {
        "recipe.steps": STEPS, "train.eval_every": 20, "train.checkpoint_every": 10, "train.log_every": 5,
        "eval.task_size": 16, "eval.kl_tokens": 1024, "eval.bootstrap_samples": 50, "eval.placement": "task",
        "cluster.workers": 1, "cluster.cpus_per_worker": 0.25,
        "cluster.resources_per_worker": {"CPU": 0, "trainer": 1},
        "cluster.evaluator_resources": {"CPU": 0.25, "evaluator": 1},
        "cluster.storage": str(storage), "cluster.max_failures": 2,
        "search.searcher": "grid", "search.space": {"points": points}, "search.milestones": [STEPS],
        "search.max_concurrent": 2, "search.trial_cpus": 0.25})
    config_io.save(cfg, path)
    return path


def _committed_checkpoint(storage: Path) -> bool:
    """A trial's Train run has a checkpoint in its snapshot, so a restart has something to resume."""
    for snap in storage.glob("trials/*/checkpoint_manager_snapshot.json"):
        try:
            if "step_" in snap.read_text():
                return True
        except OSError:
            pass
    return False


def test_search_places_work_by_resources_and_survives_a_lost_trainer_node(tiny_setup, cluster, tmp_path):
    cfg, _ = tiny_setup
    storage = cluster.root / "shared"  # one machine: a local directory is storage every node sees
    conf = _config(cfg, tmp_path / "search.yaml", storage)
    out = tmp_path / "s"
    t0 = time.time()

    head = cluster.head({"evaluator": 2})
    head_id = head.node_id()
    trainer = cluster.worker("w1", {"trainer": 2})
    trainer_id = trainer.node_id()
    cluster.wait_for_nodes(2)

    log = open(tmp_path / "search.log", "w")
    proc = subprocess.Popen([RAYQ, "search", "--config", str(conf), "--out", str(out), "--address", cluster.address],
                            env=_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    replacement_id = None
    try:
        deadline = t0 + 300
        while not _committed_checkpoint(storage):
            assert proc.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint committed in time"
            time.sleep(0.2)
        assert proc.poll() is None, "the search finished before the kill"
        killed_at = time.time()
        trainer.kill()  # mid-trial: its train workers die with the node
        replacement = cluster.worker("w2", {"trainer": 2})  # the trainer pool comes back on a new node
        replacement_id = replacement.node_id()
        proc.wait(timeout=max(60.0, BUDGET_S - (time.time() - t0)))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "search.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    print(f"multinode: kill after {killed_at - t0:.0f}s, search done after {time.time() - t0:.0f}s")

    rows = pq.read_table(out / "results.parquet").to_pylist()
    trials = {r["trial_id"] for r in rows}
    assert len(trials) == 2
    for tid in trials:  # both recipes trained to the end
        assert max(r["step"] for r in rows if r["trial_id"] == tid) == STEPS, tid

    # placement: training only where `trainer` is, evaluation only where `evaluator` is
    train_nodes = {r["train/node_id"] for r in rows if r.get("train/node_id")}
    eval_nodes = {r["eval/node_id"] for r in rows if r.get("eval/node_id")}
    assert train_nodes and train_nodes <= {trainer_id, replacement_id}, (train_nodes, trainer_id, replacement_id)
    assert trainer_id in train_nodes and head_id not in train_nodes
    assert eval_nodes == {head_id}, (eval_nodes, head_id)
    assert all(r.get("fp/acc") is not None for r in rows if r.get("eval/node_id"))

    # the kill: training came back on the replacement node, from a checkpoint (not from step 0)
    resumed = [r for r in rows if (r.get("train/resumed_from") or 0) > 0]
    assert resumed, "no trial resumed from a checkpoint after the node was killed"
    assert all(r["train/node_id"] == replacement_id for r in resumed)
    assert {r["step"] for r in resumed if r["step"] == STEPS}

    # results landed in the shared storage: Tune's experiment and each trial's Train run
    assert list((storage / "tune").glob("experiment_state-*.json"))
    for tid in trials:
        run = storage / "trials" / f"{tid}-seed0"
        assert (run / "checkpoint_manager_snapshot.json").exists(), sorted(storage.glob("trials/*"))
        assert (run / f"step_{STEPS}").is_dir(), sorted(p.name for p in run.iterdir())
    assert not (out / "ray").exists()  # nothing went to the default storage next to --out
