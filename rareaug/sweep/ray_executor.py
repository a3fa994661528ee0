"""`sweep-ratio --executor ray`: every grid cell a Ray task with the resources it asks for.

Ray does the scheduling (fractional GPUs, many nodes, retries of lost workers); this module only turns cells
into tasks and hands each result back the moment it arrives, so the caller saves it at once and a stopped
sweep resumes with the same done markers as the local executor. Workers need rareaug installed and the run
directory and data at the same paths (one machine, or a shared file system on a cluster).
"""
from __future__ import annotations

import os
from collections.abc import Callable

from ..config import Config
from ..downloads import offline
from ..errors import RareaugError, one_line
from ..run_dir import RunDir

# Decoded images per worker process, kept between the cells it runs (Ray reuses its worker processes).
_WORKER_CACHES: dict = {}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RareaugError("--executor ray needs Ray: pip install 'rareaug[ray]' (or pip install ray), "
                           "or use --executor local") from None
    return ray


def run_cells_on_ray(plans: list, finished: Callable) -> None:
    """Every plan's pending cells as Ray tasks at once (several rare classes share the cluster);
    `finished(plan, cell, key, row, error)` as each one ends."""
    ray = _import_ray()
    sw = plans[0].config.sweep
    started_here = not ray.is_initialized()
    if started_here:
        try:
            # None starts a local instance with this machine's CPUs and GPUs; "auto" / host:port join a cluster.
            # Offline here (--offline) means offline on the cluster's workers too.
            ray.init(address=sw.ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}} if offline() else None)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RareaugError(f"--ray-address {sw.ray_address}: no Ray cluster there "
                               f"({one_line(error, 160)}); start one with `ray start --head`, or leave "
                               "--ray-address out to run a local one") from None
    pending: dict = {}
    try:
        task = ray.remote(num_cpus=sw.cpus_per_cell, num_gpus=sw.gpus_per_cell, max_retries=1)(_run_cell_task)
        cwd = os.getcwd()  # relative run paths resolve in the workers as they do here
        for plan in plans:
            for cell, key, make_data in plan.todo:
                pending[task.remote(cell, make_data(), plan.config, str(plan.run.path), cwd)] = (plan, cell, key)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            plan, cell, key = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except Exception as error:  # a failing cell must not lose the others; Ray wraps the worker's error
                finished(plan, cell, key, None, " ".join(str(error).split())[-600:])
                continue
            finished(plan, cell, key, row, None)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


def _run_cell_task(cell, data, config: Config, run: str, cwd: str) -> dict:
    """One cell in a Ray worker: the same `run_cell` the local executor calls, with as many threads as CPUs asked."""
    import torch

    from ..device import resolve_device
    from .stage import run_cell

    os.chdir(cwd)
    torch.set_num_threads(max(1, int(config.sweep.cpus_per_cell)))
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it granted (none when --gpus-per-cell is 0): "cuda" is that one.
    device = resolve_device("cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu")
    return run_cell(cell, data, config, _WORKER_CACHES, device, RunDir(run))
