"""Scale-out on ``torch.distributed``: recognising a ``torchrun`` / ``accelerate launch`` from the
environment, the process group of a command, and the few collectives the library needs.

Why one owner: ``collect`` and ``finetune`` (and a user's own DDP/FSDP2 loop summing statistics)
must agree on what a launch is, which backend a device gets, which rank writes, and how sums
cross processes. Nothing here launches processes: ``torchrun`` (or ``accelerate launch``, which
sets the same variables) does, and its rendezvous does multi-node.

Without the launch variables nothing changes: :func:`launched` yields ``None``, :func:`rank` is
0, :func:`world_size` is 1, collectives are no-ops. A low-level utility: it imports nothing of
the library.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

__all__ = ["LAUNCH_VARIABLES", "DistributedError", "StoppedWithMain", "Launch", "launch_env", "launched", "is_initialized", "rank",
           "world_size", "local_rank", "is_main", "barrier", "all_reduce_sum", "check_same_everywhere",
           "device_for", "broadcast_object", "run_on_main", "main_first", "name_hash"]

#: what ``torchrun`` and ``accelerate launch`` set for every worker process
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A launch or a collective that cannot work; the message is one line saying why and what to do."""


class StoppedWithMain(DistributedError):
    """Raised on ranks other than 0 when rank 0's part of :func:`run_on_main` failed: rank 0
    reports the reason itself, so a command line prints it once (rank 0's line), not once per process."""


class Launch:
    """What the environment says about this process: ``rank``, ``world_size``, ``local_rank``,
    ``master`` (``addr:port``), and, inside :func:`launched`, the ``backend`` and ``device``."""

    def __init__(self, rank: int, world_size: int, local_rank: int, master: str) -> None:
        self.rank, self.world_size, self.local_rank, self.master = rank, world_size, local_rank, master
        self.backend: Optional[str] = None
        self.device: Optional[torch.device] = None

    def __repr__(self) -> str:
        return (f"Launch(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"master={self.master!r}, backend={self.backend!r})")


def launch_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Launch]:
    """The launch described by ``environ`` (default ``os.environ``): None when none of ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK`` is set (``MASTER_ADDR``/``MASTER_PORT`` alone describe no
    processes: ``accelerate launch`` sets them for its one-process launcher, a shell may export
    them); :class:`DistributedError` when only some of :data:`LAUNCH_VARIABLES` are, or a value is
    not a valid number."""
    env = os.environ if environ is None else environ
    present = {k: env[k] for k in LAUNCH_VARIABLES if env.get(k, "") != ""}
    if not any(k in present for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    missing = [k for k in LAUNCH_VARIABLES if k not in present]
    if missing:
        raise DistributedError(
            f"half-set distributed environment: {', '.join(f'{k}={v}' for k, v in present.items())} but "
            f"{', '.join(missing)} unset; start the command with torchrun (e.g. torchrun --nproc_per_node 2 "
            f"lape-kernels ...) or accelerate launch, or unset {', '.join(present)} for one process")
    values: Dict[str, int] = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            values[k] = int(present[k])
        except ValueError:
            raise DistributedError(f"distributed environment: {k}={present[k]!r} is not an integer") from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"] or values["LOCAL_RANK"] < 0:
        raise DistributedError(f"distributed environment: RANK={values['RANK']} WORLD_SIZE={values['WORLD_SIZE']} "
                               f"LOCAL_RANK={values['LOCAL_RANK']} is not a valid rank of the world (0 <= RANK < "
                               f"WORLD_SIZE, LOCAL_RANK >= 0)")
    return Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"],
                  f"{present['MASTER_ADDR']}:{values['MASTER_PORT']}")


def is_initialized() -> bool:
    """A default process group exists (ours from :func:`launched`, or the user's own)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank(group=None) -> int:
    """This process's rank in ``group`` (the default group): 0 without a process group."""
    return torch.distributed.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    """The number of processes in ``group`` (the default group): 1 without a process group."""
    return torch.distributed.get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` of a launch (this process's GPU on its node); 0 otherwise."""
    launch = launch_env()
    return launch.local_rank if launch is not None else 0


def is_main(group=None) -> bool:
    """True on the process that writes outputs and shows progress (rank 0; the only one without
    a process group)."""
    return rank(group) == 0


def barrier(group=None) -> None:
    """Wait for every process of ``group``; a no-op without a process group."""
    if not is_initialized() or world_size(group) == 1:
        return
    if torch.distributed.get_backend(group) == "nccl":
        torch.distributed.barrier(group, device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier(group)


def device_for(device: torch.device) -> torch.device:
    """The device a process works on: inside a launch, a bare ``cuda`` is this process's GPU
    (``cuda:LOCAL_RANK``); an explicit ``cuda:N`` or ``cpu`` is kept."""
    if device.type == "cuda" and device.index is None:
        launch = launch_env()
        if launch is not None:
            return torch.device("cuda", launch.local_rank)
    return device


def _comm_device(group=None) -> torch.device:
    """Where tensors must be for a collective of ``group``'s backend (NCCL: this process's GPU)."""
    if "nccl" in str(torch.distributed.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor], group=None) -> List[torch.Tensor]:
    """The element-wise sums of ``tensors`` over every process of ``group``, as new tensors on
    each input's device (inputs unchanged). Tensors of one dtype travel in one flat buffer (one
    collective per dtype); int64 counts stay exact. Every process must pass tensors of the same
    dtypes and shapes in the same order (:func:`check_same_everywhere` first when unsure).
    Without a process group (or in a world of one): copies."""
    tensors = list(tensors)
    out = [t.detach().clone() for t in tensors]
    if not is_initialized() or world_size(group) == 1 or not tensors:
        return out
    dev = _comm_device(group)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype in sorted(by_dtype, key=str):  # the same order on every process
        idx = by_dtype[dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1).to(dev) for i in idx]) if idx else None
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].reshape(tensors[i].shape).to(tensors[i].device)
            offset += n
    return out


def check_same_everywhere(signature: Sequence[int], what: str, group=None) -> None:
    """Raise :class:`DistributedError` on every process (never a hang, never a wrong sum) when
    ``signature`` (a few integers: shapes, flags, :func:`name_hash` values) differs between the
    processes of ``group``; ``what`` names the thing compared in the message."""
    if not is_initialized() or world_size(group) == 1:
        return
    dev = _comm_device(group)
    mine = torch.tensor([len(signature), *signature], dtype=torch.int64)
    width = torch.tensor([mine.numel()], dtype=torch.int64, device=dev)
    torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX, group=group)
    padded = torch.full((int(width.item()),), -1, dtype=torch.int64)
    padded[:mine.numel()] = mine
    gathered = [torch.empty_like(padded, device=dev) for _ in range(world_size(group))]
    torch.distributed.all_gather(gathered, padded.to(dev), group=group)
    rows = [g.cpu() for g in gathered]
    bad = [r for r, row in enumerate(rows) if not torch.equal(row, rows[0])]
    if bad:
        raise DistributedError(f"{what} differ between ranks (rank {bad[0]} vs rank 0: {rows[bad[0]].tolist()} vs "
                               f"{rows[0].tolist()}); every rank must hold the same model and languages")


def broadcast_object(obj: Any = None, group=None) -> Any:
    """Rank 0's ``obj`` (picklable, small: a decision, a few numbers) on every process of
    ``group``; ``obj`` itself without a process group."""
    if not is_initialized() or world_size(group) == 1:
        return obj
    box = [obj]
    kwargs = {"device": _comm_device(group)} if "nccl" in str(torch.distributed.get_backend(group)) else {}
    torch.distributed.broadcast_object_list(box, src=0, group=group, **kwargs)
    return box[0]


def run_on_main(work: Callable[[], Any], group=None) -> Any:
    """``work()`` run by rank 0 only (it reads or writes files, decides), its result returned on
    every process. When it raises, rank 0 re-raises the exception and every other rank raises
    :class:`DistributedError` with rank 0's message, so all stop with the same one-line reason
    instead of waiting at the next collective. Without a process group: ``work()``."""
    if not is_initialized() or world_size(group) == 1:
        return work()
    if is_main(group):
        try:
            result = work()
        except BaseException as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            broadcast_object(("error", text), group)
            raise
        broadcast_object(("ok", result), group)
        return result
    status, value = broadcast_object(None, group)
    if status == "error":
        raise StoppedWithMain(f"stopped with rank 0: {value}")
    return value


def main_first(work: Callable[[], Any], group=None) -> Any:
    """``work()`` on every process, rank 0's run first and the others' after it succeeded (a
    download, a conversion or a cache that one process fills and the others then read; rank
    0's failure stops them all, as in :func:`run_on_main`). Without a process group: ``work()``."""
    if not is_initialized() or world_size(group) == 1:
        return work()
    if is_main(group):
        box: List[Any] = []

        def first() -> None:
            box.append(work())

        run_on_main(first, group)
        return box[0]
    run_on_main(lambda: None, group)  # waits for rank 0's outcome (its error raised here too)
    return work()


def name_hash(text: Optional[str]) -> int:
    """A 62-bit integer standing for ``text`` in a :func:`check_same_everywhere` signature."""
    if text is None:
        return 0
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little") >> 2


@contextlib.contextmanager
def launched(device: Optional[torch.device] = None, *, timeout_s: Optional[float] = None) -> Iterator[Optional[Launch]]:
    """The process group of a command started by ``torchrun`` / ``accelerate launch``.

    Without the launch variables: yields None and changes nothing. With them: initialises the
    default process group from the environment (``env://``; NCCL on this process's GPU
    ``cuda:LOCAL_RANK`` when ``device`` is CUDA, gloo otherwise) and yields the :class:`Launch`;
    on the way out the processes meet at a barrier (normal exit only: after a failure the
    others may never arrive, and ``torchrun`` stops them) and the group is destroyed. A process
    group that already exists (the user's own) is used as is and left alone.
    """
    launch = launch_env()
    if launch is None:
        yield None
        return
    if is_initialized():  # someone else owns the group
        launch.backend = str(torch.distributed.get_backend())
        yield launch
        return
    if not torch.distributed.is_available():
        raise DistributedError("a distributed launch (RANK/WORLD_SIZE set) but this PyTorch build has no "
                               "torch.distributed")
    cuda = device is not None and torch.device(device).type == "cuda"
    kwargs = {}
    if timeout_s is not None:
        import datetime

        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if cuda:
        if not torch.cuda.is_available() or launch.local_rank >= torch.cuda.device_count():
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise DistributedError(f"LOCAL_RANK={launch.local_rank} needs GPU {launch.local_rank} but this node has "
                                   f"{have} CUDA device(s); start at most {have} processes per node "
                                   f"(--nproc_per_node) or use --device cpu")
        launch.device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(launch.device)
        launch.backend = "nccl"
        torch.distributed.init_process_group("nccl", device_id=launch.device, **kwargs)
    else:
        launch.device = torch.device("cpu")
        launch.backend = "gloo"
        torch.distributed.init_process_group("gloo", **kwargs)
    ok = False
    try:
        yield launch
        ok = True
    finally:
        try:
            if ok:
                barrier()  # nobody tears the group down while another rank still talks to it
        finally:
            torch.distributed.destroy_process_group()
