"""Molecules sharded over Python threads: a second core for the adjoint and the loss without intra-op threads.

The samples of a batch are independent in a flow's velocity (for molecules: messages run inside each molecule),
so the lean adjoint and the AM loss of a batch are the per-sample results of its parts, put back together.
Running the parts in Python threads, each with one torch intra-op thread, uses k cores with one op stream each:
PyTorch releases the GIL inside its kernels. On the 2-core CPU this beat torch's own 2 intra-op threads on the
base network's forward + VJP (`bench/bench_shard_threads.py`: 1.10x compiled, 1.16x eager, quiet machine) and
held up under load where the intra-op threads collapsed (1.36x over 1 thread against 0.21x, two other jobs).

Results equal the unsharded computation up to float rounding (the order of sums); autograd supports
concurrent backward passes into shared parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

from .flow import Trajectory

__all__ = ["sample_costs", "balanced_shards", "run_in_threads"]

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[int, ThreadPoolExecutor] = {}


def sample_costs(traj: Trajectory) -> Tensor:
    """(n,) float: the work of each sample in one network call, ∝ rows² (a molecule's atom pairs are its edges)."""
    if traj.group is None:
        return torch.ones(traj.n)
    rows = torch.bincount(traj.group.cpu(), minlength=traj.n).double()
    return rows * rows


def balanced_shards(costs: Tensor, k: int, among: Tensor | None = None) -> list[Tensor]:
    """At most ``k`` disjoint non-empty (n,) bool masks over the samples where ``among`` (n,) bool (default all),
    of near-equal total cost (greedy: the costliest sample goes to the lightest shard). Empty list if none."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = costs.numel()
    idx = torch.arange(n) if among is None else torch.nonzero(among.cpu(), as_tuple=False).flatten()
    k = min(k, idx.numel())
    if k == 0:
        return []
    order = idx[torch.argsort(costs[idx], descending=True, stable=True)].tolist()
    loads = [0.0] * k
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(k)]
    for i in order:
        j = min(range(k), key=loads.__getitem__)
        masks[j][i] = True
        loads[j] += float(costs[i])
    return masks


def run_in_threads(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(item) for item in items], one Python thread per item and one torch intra-op thread each.

    torch's intra-op thread count is process-wide: it is 1 while the items run and restored afterwards. A single
    item runs in the calling thread, unchanged. The caller's gradient mode (thread-local) holds in every item."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    pool = _POOLS.get(len(items))
    if pool is None:
        pool = _POOLS[len(items)] = ThreadPoolExecutor(len(items), thread_name_prefix="fdc-shard")
    grad = torch.is_grad_enabled()  # thread-local: a worker would otherwise start with gradients on

    def call(item: T) -> R:
        with torch.set_grad_enabled(grad):
            return fn(item)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(call, item) for item in items]
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)
