"""pytest setup shared by ``tests/`` and ``sim/``.

Under pytest-xdist each worker gets ``cpus // workers`` torch threads (at least one): torch's
default of one thread per core in every worker oversubscribes the machine, and its OpenMP
threads then spin against each other (model training in the tests ran several times slower
on the 2-core CI machine).
"""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 0:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # simulator subprocesses
    import torch

    torch.set_num_threads(threads)
