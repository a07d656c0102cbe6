"""Distributed data-parallel training under ``torchrun`` (gloo on CPU, nccl on CUDA).

``torchrun --nproc-per-node N -m rcomp finetune ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`setup` then joins the process group and the model is wrapped in
DistributedDataParallel. ``--batch-size`` stays the *global* batch: every optimizer step sees
the same examples as a single-process run with the same seed, split into ``N`` near-equal
shards (:class:`GlobalBatchSampler`), and each shard's summed loss is scaled by
``N / global batch`` so that DDP's gradient averaging yields exactly the single-process mean
gradient. Without BatchNorm (whose statistics are per shard) the result equals single-process
training up to floating-point summation order. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def is_main_process() -> bool:
    """False only in a torchrun process other than rank 0 (read from the environment; no process group needed)."""
    return not launched() or os.environ.get("RANK", "0") == "0"


def local_device(info: DistInfo, device: str) -> str:
    """This process's device: under torchrun with CUDA, the GPU of its local rank (one GPU per process)."""
    if info.enabled and device.startswith("cuda"):
        import torch

        torch.cuda.set_device(info.local_rank)
        return f"cuda:{info.local_rank}"
    return device


def setup(device: str, backend: str | None = None, timeout_s: float | None = None) -> tuple[DistInfo, str]:
    """Join the process group if launched by torchrun; returns (info, this process's device).
    ``backend``: gloo or nccl (default: nccl for a CUDA device, else gloo); ``timeout_s``: how long a
    collective waits for the other processes (torch's default otherwise)."""
    if not launched():
        return DistInfo(), device
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank, world, local)
    device = local_device(info, device)
    if not dist.is_initialized():
        kw = {}
        if timeout_s is not None:
            import datetime

            kw["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend or ("nccl" if device.startswith("cuda") else "gloo"), **kw)
    return info, device


def teardown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group(given: DistInfo | None, device: str) -> Iterator[tuple[DistInfo, str]]:
    """(info, this process's device) for one stage: the caller's group when ``given`` (a recipe under
    torchrun owns it; ``DistInfo()`` runs this process alone), else the one torchrun launched, joined
    here and left when the stage ends."""
    if given is not None:
        yield given, local_device(given, device)
        return
    info, device = setup(device)
    try:
        yield info, device
    finally:
        teardown(info)


def wrap(model, info: DistInfo, device: str):
    if not info.enabled:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def all_sum(values: list[float], info: DistInfo, device: str = "cpu") -> list[float]:
    """Sum ``values`` over all processes (identity when not distributed)."""
    if not info.enabled:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast(value, info: DistInfo):
    """Rank 0's ``value`` (JSON-like data), in every process (identity when not distributed)."""
    if not info.enabled:
        return value
    import json

    import torch
    import torch.distributed as dist

    # JSON through a byte tensor: torch's broadcast_object_list would pickle
    data = json.dumps(value).encode() if info.is_main else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if info.is_main else \
        torch.zeros(int(size), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.tolist()).decode())


def all_gather_json(value, info: DistInfo) -> list:
    """Every process's ``value`` (JSON-like data), in rank order, in every process (``[value]`` when not
    distributed)."""
    if not info.enabled:
        return [value]
    import json

    import torch
    import torch.distributed as dist

    data = json.dumps(value).encode()  # JSON through byte tensors: all_gather_object would pickle
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(info.world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(info.world)]
    dist.all_gather(bufs, mine)
    return [json.loads(bytes(b[: int(s)].tolist()).decode()) for b, s in zip(bufs, sizes, strict=True)]


def first_to_fail() -> bool:
    """In a failing process of a launched group: True for the first process to call this (it says why the
    run stopped), False for every later one (they stop without a word, so a failure is printed once).
    True when not launched, or when the group's store cannot be reached (saying it twice beats not at all)."""
    if not launched():
        return True
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return True
        store = dist.distributed_c10d._get_default_store()
        return int(store.add("rcomp/failed", 1)) == 1
    except Exception:  # noqa: BLE001 - the store went with a process that already stopped
        return True


def another_failed() -> bool:
    """In a launched group: whether a process has already failed (:func:`first_to_fail`), or the group's
    store went with a process that stopped."""
    try:
        import torch.distributed as dist

        if not launched() or not dist.is_initialized():
            return False
        return bool(dist.distributed_c10d._get_default_store().check(["rcomp/failed"]))
    except Exception:  # noqa: BLE001 - the store is gone: its process (rank 0) stopped
        return True


def _store(info: DistInfo):
    """The group's key-value store (torchrun's TCPStore), or None when not distributed."""
    if not info.enabled:
        return None
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def claim(key: str, info: DistInfo) -> bool:
    """True in exactly one process of the group that asks for ``key`` (the first; atomic in the group's
    store), False in the others; always True when not distributed."""
    store = _store(info)
    return True if store is None else int(store.add(f"rcomp/claim/{key}", 1)) == 1


def mark(key: str, info: DistInfo) -> None:
    """Set flag ``key`` for every process of the group (see :func:`marked`)."""
    store = _store(info)
    if store is not None:
        store.set(f"rcomp/mark/{key}", "1")


def marked(key: str, info: DistInfo) -> bool:
    """Whether a process of the group has set flag ``key`` (:func:`mark`); never blocks."""
    store = _store(info)
    return store is not None and bool(store.check([f"rcomp/mark/{key}"]))


def all_ok(ok: bool, info: DistInfo) -> bool:
    """True in every process when ``ok`` is true in every process (identity when not distributed)."""
    if not info.enabled:
        return ok
    import torch
    import torch.distributed as dist

    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t) == 0


class GlobalBatchSampler:
    """Yields this process's shard of each global batch of an epoch's (seeded) permutation.

    Each item of an epoch is ``(indices, global_size, offset)``. The permutation depends only on
    ``seed`` and ``epoch``; a final global batch smaller than the number of processes is dropped
    when distributed (every process needs at least one example).
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world

    def batches(self, epoch: int):
        import torch

        from rcomp.seeding import derive_seed, generator

        if self.shuffle:
            g = generator(derive_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            glob = order[start:start + self.batch_size]
            if len(glob) < self.world:
                break
            shards = torch.tensor_split(glob, self.world)
            offset = sum(len(s) for s in shards[: self.rank])
            yield shards[self.rank].tolist(), len(glob), offset

    def num_batches(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world else 0)
