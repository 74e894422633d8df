"""The layer-streaming profile from N Ray workers: the same profile, for checkpoints one machine cannot hold.

    prof, importance, counts = profile_on_ray("path/to/checkpoint", token_ids, fingerprint, workers=4)

Each worker (a Ray actor: one per GPU when the cluster has GPUs, `num_gpus=1`, else CPU workers) is
a LayerwiseProfiler over a share of the calibration windows (whole batches, contiguous): it reads
every layer from the checkpoint path itself (the path must be on a filesystem every node mounts at
the same place; the weights never pass through the driver or the object store; every node needs
moeplan installed, the same version), runs the reference pass, the local runs and every hidden-state
stream of its windows, and the error kernel on its part of each layer's tensor groups (the largest
first, each to the least loaded worker). The quantized copies of a layer's tensors are recomputed by
every worker from the same weights and importance (the kernels are deterministic: the same bytes
everywhere), not shipped.

The statistics a layer needs before its error kernel (sums of x^2 per tensor input, token counts,
expert routing counts, weight sums, REAP sums) and the head's importance are added over the workers
by a coordinator actor (`_Coordinator.allreduce`, in rank order: the sum does not depend on which
worker comes first); every other measurement is a sum over the share's tokens (energies, KL sums,
Fisher sums, the work count), added on the driver at the end (layerwise.ADDITIVE). So the profile
equals the single-process one up to the order of those sums: one worker gives the same numbers bit
for bit (with the same threads); two agree to a relative 1e-12 in the tensor damages (double sums) and
1e-4 in the expert removal and top-k costs (float32 KLs of small changes, measured on re-routed token
subsets whose size differs per share) on tiny-qwen3-moe (tests/test_ray.py).

Faults: every worker writes its state (its hidden states and measurements, layerwise's resumable
state) after each step to `state_dir` (default: a private directory in the temp directory of its
node). A worker that dies is restarted by Ray (max_restarts) and resumes after its last finished
step; the coordinator keeps the last sums it added, so the replayed steps get the same totals, and
the others wait for it at the next sum. A lost node needs `state_dir` on a shared filesystem.

The driver holds the settings, the coordinator's last sums and, at the end, the workers'
measurements (no weights, no hidden states). Resumption of an interrupted run (the --out state file)
is a single-process feature.
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .activations import default_ram_budget
from .layerwise import ADDITIVE, LayerwiseProfiler
from .profile import Profile

RAY_MISSING = "profiling on Ray needs the ray extra: pip install -e '.[ray]' (ray>=2.60,<3)"
UNAVAILABLE_S = 600  # how long a restarting worker is waited for
KEEP_SUMS = 4  # the coordinator keeps the totals of this many latest sums (a restarted worker replays one)


def import_ray():
    """The ray module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


def add_sums(parts: Sequence[Any]) -> Any:
    """The sum of the shares' nested sums (dicts of numbers, arrays and lists of numbers), added in the
    order given; a key a share lacks counts as zero there. One part: returned as it is."""
    first = parts[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for p in parts for k in p))
        return {k: add_sums([p[k] for p in parts if k in p]) for k in keys}
    if isinstance(first, list):
        if any(len(p) != len(first) for p in parts):
            raise ValueError("the shares' measurements differ in length; they come from different runs")
        return [add_sums([p[i] for p in parts]) for i in range(len(first))]
    total = first
    for p in parts[1:]:
        total = total + p
    return total


def merge_measurements(ms: Sequence[dict]) -> dict:
    """One profiler's measurements from the shares': the sums (ADDITIVE) added, the error kernel's
    results (each tensor measured by one share) joined, the rest (the same in every share) from the
    first; seconds per part: the slowest share's."""
    out = dict(ms[0])
    for k in ADDITIVE:
        out[k] = add_sums([m[k] for m in ms])
    out["err"] = {}
    for m in ms:
        out["err"].update(m["err"])
    # the error kernel's row samples: each tensor on one share, so its counters add up
    es = [m["error_sampling"] for m in ms]
    out["error_sampling"] = {k: max(e[k] for e in es) if k == "max_relative_se" else sum(e[k] for e in es)
                             for k in es[0]}
    parts = dict.fromkeys(k for m in ms for k in m["seconds"])
    out["seconds"] = {k: max(m["seconds"].get(k, 0.0) for m in ms) for k in parts}
    return out


def split_work(sizes: dict[str, float], n: int) -> dict[str, int]:
    """Each key to a worker: the largest first, each to the least loaded (ties: the lowest rank)."""
    load = [0.0] * n
    owner = {}
    for key, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(n), key=lambda i: (load[i], i))
        owner[key] = r
        load[r] += size
    return owner


def split_windows(n_windows: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous shares of whole batches, as even as can be: [start, stop) window ranges."""
    n_batches = math.ceil(n_windows / batch_size)
    if workers > n_batches:
        raise ValueError(f"--workers {workers}: the calibration set has {n_batches} batches of {batch_size} windows "
                         f"and each worker needs one; use at most {n_batches} workers or more --tokens")
    bounds = [round(i * n_batches / workers) for i in range(workers + 1)]
    return [(bounds[i] * batch_size, min(bounds[i + 1] * batch_size, n_windows)) for i in range(workers)]


def _pickled_bytes(x: Any) -> int:
    return len(pickle.dumps(x, protocol=5))


class _Coordinator:
    """Adds the workers' sums of each tag, in rank order, once all of them have given theirs (an async
    actor: the callers wait). A tag's total is kept while it is one of the KEEP_SUMS latest, so that a
    restarted worker that replays a step gets the same total; its second contribution is ignored."""

    def __init__(self, workers: int):
        self.n = workers
        self.parts: dict[str, dict[int, Any]] = {}
        self.totals: dict[str, asyncio.Future] = {}
        self.order: list[str] = []
        self.bytes_in = 0
        self.bytes_out = 0

    def _future(self, tag: str) -> asyncio.Future:
        if tag not in self.totals:
            if tag in self.order:
                raise RuntimeError(f"sum {tag} was asked for again after it was dropped")
            self.totals[tag] = asyncio.get_running_loop().create_future()
        return self.totals[tag]

    async def allreduce(self, tag: str, rank: int, sums: Any) -> Any:
        fut = self._future(tag)
        self.bytes_in += _pickled_bytes(sums)
        if not fut.done():
            parts = self.parts.setdefault(tag, {})
            parts.setdefault(rank, sums)
            if len(parts) == self.n:
                fut.set_result(add_sums([parts[r] for r in range(self.n)]))
                del self.parts[tag]
                self.order.append(tag)
                for old in self.order[:-KEEP_SUMS]:
                    self.totals.pop(old, None)
        total = await asyncio.shield(fut)
        self.bytes_out += _pickled_bytes(total)
        return total

    def progress(self) -> dict:
        return {"sums": list(self.order), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


class _ShareProfiler(LayerwiseProfiler):
    """A LayerwiseProfiler of one worker's share: its sums added over the workers by the coordinator,
    the error kernel on its part of the tensor groups."""

    def __init__(self, *args, rank: int, workers: int, coordinator, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.workers, self.coordinator = rank, workers, coordinator
        self.state_peak = 0  # the largest state file written (bytes)

    def _allreduce(self, tag: str, sums: dict) -> dict:
        ray = import_ray()
        return ray.get(self.coordinator.allreduce.remote(tag, self.rank, sums))

    def _owned(self, sizes: dict[str, float]) -> set[str]:
        return {k for k, r in split_work(sizes, self.workers).items() if r == self.rank}

    def _save(self, settings: dict, done: int) -> None:
        super()._save(settings, done)
        self.state_peak = max(self.state_peak, self.state_path.stat().st_size)


def _rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return 0


class _Worker:
    """One Ray actor: a _ShareProfiler whose state survives the process (restarts resume from it)."""

    def __init__(self, rank: int, workers: int, model_dir: str, ids, share: tuple[int, int], coordinator,
                 state_dir: str, threads: int, kwargs: dict):
        import socket

        torch.set_num_threads(threads)
        if not Path(model_dir, "config.json").is_file():
            raise ValueError(f"the checkpoint {model_dir} is not readable on the Ray node {socket.gethostname()}: "
                             "the workers read the layers from the checkpoint path themselves; put it on a "
                             "filesystem every node mounts at the same path")
        d = Path(state_dir)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
            raise ValueError(f"Ray worker state directory {d} is not a directory of this user")
        self.rank, self.state = rank, d / f"share-{rank}.state.safetensors"
        self.resumed = self.state.exists()
        self.starts = d / f"share-{rank}.starts"  # one line per start of this worker: Ray's restarts counted
        with open(self.starts, "a") as f:
            f.write(f"{os.getpid()}\n")
        self.rss_start = _rss()
        self.p = _ShareProfiler(model_dir, ids, share=share, state_path=self.state, progress=False, threads=threads,
                                rank=rank, workers=workers, coordinator=coordinator, **kwargs)

    def run(self, fingerprint: str) -> dict:
        t0 = time.perf_counter()
        self.p._steps(self.p._settings(fingerprint))
        self.p.activations.close()
        self.p.sm.close()
        state_bytes = self.p.state_peak
        self.state.unlink(missing_ok=True)
        starts = len(self.starts.read_text().split())
        self.starts.unlink(missing_ok=True)
        try:
            self.state.parent.rmdir()  # the last worker of this node to finish removes the directory
        except OSError:
            pass
        return {"m": self.p.m, "importance": self.p.importance if self.rank == 0 else None,
                "counts": self.p.token_counts if self.rank == 0 else None,
                "pid": os.getpid(), "resumed": self.resumed, "seconds": time.perf_counter() - t0,
                "rss_start": self.rss_start, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "state_bytes": state_bytes, "restarts": starts - 1}


def _init(ray, address: str | None, cpus: int | None) -> bool:
    """Ray connected (True: started here, to be shut down here)."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise ValueError(f"--ray {address}: no Ray cluster there ({exc}); start one (ray start --head) or give "
                             "its address") from None
    return True


def local_cluster_env() -> None:
    """A local Ray cluster reachable from this machine only: its services bind 127.0.0.1 (set before ray
    is first imported; ray reads it at import)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def profile_on_ray(model_dir: str | Path, calib_ids, fingerprint: str, *, address: str | None = None,
                   workers: int | None = None, state_dir: str | Path | None = None, max_restarts: int = 3,
                   progress: bool = True, on_start=None, **kwargs) -> tuple[Profile, dict[str, np.ndarray], dict]:
    """The layer-streaming profile of `model_dir` measured by `workers` Ray workers: (profile, importance
    vectors, token counts), the same as LayerwiseProfiler(model_dir, calib_ids, **kwargs).run(fingerprint)
    up to the order of the sums. `address`: None starts a local cluster (127.0.0.1 only), "auto" or
    host:port joins a running one. `workers`: default one per GPU, else one per CPU, at most one per
    calibration batch. `on_start(actors, coordinator)` is called once the workers run (tests use it)."""
    if address is None and "ray" not in sys.modules:
        local_cluster_env()
    ray = import_ray()
    if kwargs.get("state_path") is not None:
        raise ValueError("a resumable state file is for the single-process profiler; on Ray each worker keeps "
                         "its own (state_dir)")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: give at least 1")
    started = _init(ray, address, None if address is not None else (os.cpu_count() or 1))
    coordinator, actors = None, []
    own_dir = state_dir is None
    if state_dir is None:  # on each worker's node; unguessable, so nothing can be planted there first
        state_dir = Path(tempfile.gettempdir()) / f"moeplan-ray-{uuid.uuid4().hex}"
    state_dir = Path(state_dir)
    try:
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        device = "cuda" if gpus else kwargs.pop("device", "cpu")
        kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None) or (torch.bfloat16 if device == "cuda" else torch.float32)
        threads = kwargs.pop("threads", None)
        kwargs.pop("progress", None)
        # the driver: settings, the measurements' merge and the profile (the model on the meta device only)
        driver = LayerwiseProfiler(model_dir, calib_ids, progress=False, dtype=dtype, **kwargs)
        kwargs["removal"] = driver.removal  # "auto" decided once, on all the windows
        n_windows, batch = driver.windows.shape[0], driver.share.batch_size
        if workers is None:
            workers = min(gpus or cpus, math.ceil(n_windows / batch))
        shares = split_windows(n_windows, batch, workers)
        threads = threads or max(1, cpus // workers)
        if gpus and workers > gpus:
            raise ValueError(f"--workers {workers}: the Ray cluster has {gpus} GPU(s) and a worker takes one; use at "
                             f"most {gpus}")
        if not gpus and workers * threads > cpus:
            raise ValueError(f"--workers {workers} x {threads} thread(s) each: the Ray cluster has {cpus} CPUs; use "
                             "fewer workers or --threads")
        if kwargs.get("activations_ram") is None and address is None:
            kwargs["activations_ram"] = default_ram_budget() // workers  # one machine shared by the workers
        worker_cls = ray.remote(_Worker)
        coordinator = ray.remote(_Coordinator).options(num_cpus=0, max_restarts=0).remote(workers)
        ids = torch.as_tensor(calib_ids)
        actors = [worker_cls.options(num_cpus=threads, num_gpus=1 if gpus else 0, max_restarts=max_restarts,
                                     max_task_retries=0,
                                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}}).remote(
            r, workers, str(model_dir), ids, shares[r], coordinator, str(state_dir), threads,
            kwargs | {"device": device, "dtype": dtype}) for r in range(workers)]
        if on_start is not None:
            on_start(actors, coordinator)
        t0 = time.perf_counter()
        results = _run_workers(ray, actors, fingerprint, max_restarts, progress, coordinator, driver.sm.n_layers)
        wall = time.perf_counter() - t0
        moved = ray.get(coordinator.progress.remote())
        driver.m = merge_measurements([r["m"] for r in results])
        driver.m["seconds"]["total"] = wall
        driver.importance = results[0]["importance"]
        prof = driver._profile(fingerprint)
        prof.meta["device"] = device
        prof.meta["threads"] = threads
        prof.meta["ray"] = {
            "workers": workers, "address": address or "local", "gpus_per_worker": 1 if gpus else 0,
            "threads_per_worker": threads, "shares": [list(s) for s in shares],
            "restarts": [r["restarts"] for r in results],
            "quantized_copies": "recomputed by every worker (deterministic kernels)",
            "checkpoint": "read by every worker from its path",
            "sum_bytes_to_coordinator": moved["bytes_in"], "sum_bytes_from_coordinator": moved["bytes_out"],
            "result_bytes": sum(_pickled_bytes(r) for r in results),
            "peak_rss": [r["peak_rss"] for r in results], "rss_start": [r["rss_start"] for r in results],
            "worker_seconds": [round(r["seconds"], 2) for r in results],
            "state_peak_bytes": [r["state_bytes"] for r in results],
            "resumed": [r["resumed"] for r in results], "sums": len(moved["sums"]),
        }
        counts = results[0]["counts"]
        driver.sm.close()
        driver.activations.close()
        return prof, dict(driver.importance), counts
    finally:
        for a in actors:
            ray.kill(a)
        if coordinator is not None:
            ray.kill(coordinator)
        if own_dir:
            shutil.rmtree(state_dir, ignore_errors=True)  # a local cluster's workers wrote here
        if started:
            ray.shutdown()


def _run_workers(ray, actors, fingerprint: str, max_restarts: int, progress: bool, coordinator,
                 n_layers: int) -> list[dict]:
    """Every worker's run to its end; a worker that died is run again once Ray has restarted it (it
    resumes from its state), at most max_restarts times."""
    from tqdm.auto import tqdm

    results: list[dict | None] = [None] * len(actors)
    died = [0] * len(actors)
    waited: dict[int, float] = {}  # worker -> until when an unavailable (restarting) worker is waited for
    pending = {actors[r].run.remote(fingerprint): r for r in range(len(actors))}
    with tqdm(total=n_layers + 1, desc="profile (ray)", unit="sum", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if progress:
                bar.n = len(ray.get(coordinator.progress.remote())["sums"])
                bar.refresh()
            for ref in ready:
                r = pending.pop(ref)
                try:
                    results[r] = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:  # being restarted: asked again in a moment
                    if time.monotonic() > waited.setdefault(r, time.monotonic() + UNAVAILABLE_S):
                        raise RuntimeError(f"Ray worker {r} stayed unavailable for {UNAVAILABLE_S} s") from None
                    time.sleep(0.5)
                    pending[actors[r].run.remote(fingerprint)] = r
                except ray.exceptions.RayActorError as exc:
                    died[r] += 1
                    waited.pop(r, None)
                    if died[r] > max_restarts:
                        raise RuntimeError(f"Ray worker {r} died {died[r]} times; the last: {exc}") from None
                    pending[actors[r].run.remote(fingerprint)] = r
    return results
