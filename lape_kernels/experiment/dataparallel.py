"""Fine-tuning data-parallel under ``torchrun``: one global batch split over processes and
micro-batches, the model wrapped by DDP or FSDP2, the loss and validation reduced over every
process, artifacts gathered to full tensors for rank 0, and the sharded resumable state of FSDP2
(``torch.distributed.checkpoint``).

Why the result equals one process: every process computes the same global batch indices
(``finetune.batch_indices``, a pure function of seed and step) and takes a contiguous share of
``batch_size / world_size`` sequences, in ``grad_accum`` micro-batches. Each micro-batch's mean
loss is weighted by its share of the global batch's targets times the world size, so the
gradients DDP and FSDP2 average over processes are the gradient of the global batch's token mean,
the one-process loss; only the summation order differs (fp32 rounding). In one process with one
micro-batch the weight is 1 and nothing changes, bit for bit.

Why rank 0 decides: the output lock, reusing a finished run and checking an interrupted one are
decided once, by rank 0, and the outcome (or the error, as one line) reaches every process
(``distributed.run_on_main``), so no process waits for another that has already failed.

Without a process group every method here is the one-process behaviour.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .. import distributed
from ..distributed import run_on_main
from .errors import ExperimentError
from .metrics import mean_nll
from .outputs import dumps, publish, remove_path

__all__ = ["DataParallel", "split_batch", "SHARDED_DIR"]

#: the torch.distributed.checkpoint folder of an FSDP2 checkpoint (``checkpoint/sharded``)
SHARDED_DIR = "sharded"


def split_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """Sequences per micro-batch of one process; a clear error when the global batch does not
    split evenly over ``world`` processes times ``grad_accum`` micro-batches."""
    parts = world * grad_accum
    if batch_size % parts:
        who = f"{world} processes x --grad-accum {grad_accum}" if world > 1 else f"--grad-accum {grad_accum}"
        lower, upper = batch_size - batch_size % parts, batch_size + parts - batch_size % parts
        near = f"{lower} or {upper}" if lower else f"{upper}"
        raise ExperimentError(f"--batch-size {batch_size} (the global batch) does not split evenly over {who}: "
                              f"give a multiple of {parts} (e.g. {near})")
    return batch_size // parts


def _full(t: Any) -> Any:
    """A DTensor (FSDP2's sharded parameter, a clipped norm) as the full plain tensor (a
    collective: every rank calls it); anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _read_state(path: Path) -> Dict[str, Any]:
    """``state.pt`` of a checkpoint; anything unreadable is a ValueError naming it."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of damaged files
            warnings.simplefilter("ignore")
            return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state: named, with its kind of failure
        raise ValueError(f"{path / 'state.pt'}: not a checkpoint state written by lape_kernels "
                         f"({type(exc).__name__})") from None


def _resharded(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward (they are needed again at
    once): sharded again, every module holds its ``DTensor`` parameters."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@dataclass
class DataParallel:
    """How one fine-tuning run is spread: ``kind`` None (no process group: one process), ``ddp``
    or ``fsdp2``; this process's ``rank`` of ``world``; ``grad_accum`` micro-batches of ``micro``
    sequences per process and step."""

    kind: Optional[str]
    rank: int
    world: int
    grad_accum: int
    micro: int

    @classmethod
    def for_run(cls, batch_size: int, grad_accum: int, kind: str) -> "DataParallel":
        world = distributed.world_size()
        # rank 0 says it (every rank would reach the same error: one line, not one per process)
        micro = run_on_main(lambda: split_batch(batch_size, world, grad_accum))
        return cls(kind if distributed.is_initialized() else None, distributed.rank(), world, grad_accum, micro)

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ rank 0 decides
    @contextlib.contextmanager
    def held(self, make: Callable[[], Any]) -> Iterator[None]:
        """The context ``make()`` (the output lock) held by rank 0 only, for the whole block; every
        rank stops when rank 0 cannot enter it."""
        with contextlib.ExitStack() as stack:
            def enter() -> None:
                stack.enter_context(make())

            run_on_main(enter)
            yield

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module a training step runs through: DDP around ``model``, or ``model`` itself
        sharded in place by FSDP2 (``fully_shard`` per decoder layer, then the root)."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            return DDP(model, device_ids=ids, broadcast_buffers=False)
        if self.kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            from ..introspection import decoder_layers
            from ..wrappers import unwrap

            for layer in decoder_layers(unwrap(model))[1]:
                fully_shard(layer)
            fully_shard(model)
        return model

    def micro_batches(self, idx: torch.Tensor) -> List[torch.Tensor]:
        """This process's micro-batches of the global batch ``idx`` (a contiguous share)."""
        share = idx[self.rank * self.micro * self.grad_accum:(self.rank + 1) * self.micro * self.grad_accum]
        return list(share.split(self.micro))

    def loss_weight(self, n_micro: int, n_global: int) -> float:
        """The factor of a micro-batch's mean loss (``n_micro`` targets of the global batch's
        ``n_global``) that makes the gradients averaged over processes the global token mean."""
        return n_micro * self.world / n_global

    def sync(self, fwd: nn.Module, last: bool):
        """DDP: gradients are all-reduced on the last micro-batch only (``no_sync`` before)."""
        if self.kind == "ddp" and not last:
            return fwd.no_sync()
        return contextlib.nullcontext()

    def seed_step(self, seed: int, step: int) -> None:
        """Ranks other than 0 draw dropout (LoRA) from a stream of (seed, rank, step): their own
        masks, the same after a resume with any world size. Rank 0 keeps the one-process stream."""
        if self.kind is not None and not self.main:
            torch.manual_seed((int(seed) * 1_000_003 + self.rank * 7_919 + step * 104_729) % (2 ** 63 - 1))

    def sum_over_ranks(self, *values: float) -> List[float]:
        """float64 sums of ``values`` over every process (the values themselves in one process)."""
        if self.kind is None:
            return list(values)
        (total,) = distributed.all_reduce_sum([torch.tensor(values, dtype=torch.float64)])
        return total.tolist()

    def grad_norm(self, norm: Optional[torch.Tensor]) -> Optional[float]:
        return None if norm is None else float(_full(norm))

    @contextlib.contextmanager
    def full_trainable(self, model: nn.Module) -> Iterator[nn.Module]:
        """FSDP2: the trainable parameters as full plain tensors on every rank for the block (so
        ``save_neurons``, ``save_pretrained`` and the weights artifact see the whole of them);
        frozen weights stay sharded. A collective. Otherwise: ``model`` as it is."""
        if self.kind != "fsdp2":
            yield model
            return
        _resharded(model)
        swapped: List[Tuple[nn.Module, str, nn.Parameter]] = []
        gathered: Dict[int, nn.Parameter] = {}  # tied parameters stay one parameter
        try:
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is None or not p.requires_grad or not hasattr(p, "full_tensor"):
                        continue
                    if id(p) not in gathered:
                        gathered[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                    module._parameters[name] = gathered[id(p)]
                    swapped.append((module, name, p))
            yield model
        finally:
            for module, name, p in reversed(swapped):
                module._parameters[name] = p

    # ------------------------------------------------------------------ validation
    def validation_nll(self, fwd: nn.Module, val_ids: torch.Tensor, batch_size: int,
                       device: torch.device) -> Tuple[float, int]:
        """(summed NLL, predicted tokens) over every process's share of ``val_ids`` (contiguous
        shares; FSDP2 ranks with fewer batches run throw-away forwards so that every rank takes
        part in each forward's all-gathers)."""
        if self.kind is None:
            return mean_nll(fwd, val_ids, batch_size, device)
        shares = torch.tensor_split(torch.arange(val_ids.shape[0]), self.world)
        mine = val_ids.index_select(0, shares[self.rank])
        nll, n = mean_nll(fwd, mine, batch_size, device) if mine.shape[0] else (0.0, 0)
        if self.kind == "fsdp2":
            most = -(-max(s.numel() for s in shares) // batch_size)
            for _ in range(most - -(-mine.shape[0] // batch_size)):
                fwd(input_ids=val_ids[:1].to(device))
        total, count = self.sum_over_ranks(nll, n)
        return total, int(count)

    # ------------------------------------------------------------------ resumable checkpoints
    def save_checkpoint(self, model: nn.Module, opt, sched, step: int, state: Dict[str, Any], path: Path) -> None:
        """One process and DDP: rank 0 writes the full state (``runs.save_checkpoint``: every
        rank holds the same); FSDP2: :meth:`save_sharded`. A collective."""
        from .runs import save_checkpoint

        if self.kind == "fsdp2":
            return self.save_sharded(model, opt, sched, step, state, path)
        run_on_main(lambda: save_checkpoint(model, opt, sched, step, {**state, "world_size": self.world}, path))

    def load_checkpoint(self, model: nn.Module, opt, sched, path: Path) -> Tuple[int, Dict[str, Any]]:
        """The state :meth:`save_checkpoint` wrote, under any world size and either kind: sharded
        FSDP2 state is read into a whole model too, and a full state into an FSDP2 one."""
        from .runs import load_checkpoint

        if (path / SHARDED_DIR).is_dir():
            return self.load_sharded(model, opt, sched, path)
        if self.kind == "fsdp2":
            return self._load_full_sharded(model, opt, sched, path)
        return load_checkpoint(model, opt, sched, path)

    def _load_full_sharded(self, model: nn.Module, opt, sched, path: Path) -> Tuple[int, Dict[str, Any]]:
        """A full checkpoint (one process or DDP) into an FSDP2 model: every rank takes its shards
        of the full tensors; the optimizer state, saved by parameter position, is named by the
        trainable parameters' order (the optimizer's)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from ..files import load_safetensors
        from .runs import trainable_named_parameters

        tensors = load_safetensors(path / "trainable.safetensors")
        names = [n for n, _ in trainable_named_parameters(model)]
        if set(tensors) != set(names):
            raise ExperimentError(f"checkpoint {path} does not match this run's trainable parameters "
                                  f"(remove it to start over)")
        blob = _read_state(path)
        saved = blob["optimizer"]
        optim = {"state": {names[int(i)]: v for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
        _resharded(model)
        set_state_dict(model, [opt], model_state_dict=tensors, optim_state_dict=optim,
                       options=StateDictOptions(full_state_dict=True, strict=False))
        return self._rest(blob, sched, path)

    # ------------------------------------------------------------------ the sharded checkpoint (FSDP2)
    def save_sharded(self, model: nn.Module, opt, sched, step: int, state: Dict[str, Any], path: Path) -> None:
        """FSDP2's resumable state: every rank writes its shards of the trainable parameters and
        of the optimizer state (``torch.distributed.checkpoint``, under ``sharded/``); rank 0 the
        step, the scheduler and its RNG; built in a temporary folder, renamed into place."""
        import torch.distributed.checkpoint as dcp

        tmp = path.parent / f".{path.name}.tmp"

        def fresh() -> None:
            if tmp.exists():
                remove_path(tmp)
            tmp.mkdir(parents=True)

        run_on_main(fresh)
        dcp.save(self._sharded_state(model, opt), checkpoint_id=str(tmp / SHARDED_DIR))

        def finish() -> None:
            blob = {"step": step, "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            torch.save(blob, tmp / "state.pt")
            (tmp / "state.json").write_text(dumps({**state, "world_size": self.world, "distributed": self.kind}))
            publish(tmp, path)

        distributed.barrier()  # every rank's shards are written
        run_on_main(finish)

    def load_sharded(self, model: nn.Module, opt, sched, path: Path) -> Tuple[int, Dict[str, Any]]:
        """Restore :meth:`save_sharded`'s state into any model: FSDP2 with any world size (the
        checkpoint is resharded), a DDP or one-process model (each reads the whole tensors)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._sharded_state(model, opt)
        dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
        set_state_dict(model, [opt], model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        return self._rest(_read_state(path), sched, path)

    @staticmethod
    def _rest(blob: Dict[str, Any], sched, path: Path) -> Tuple[int, Dict[str, Any]]:
        """The scheduler, rank 0's RNG and the loop state of a checkpoint."""
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng_cpu"])
        if blob.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng_cuda"])
        try:
            return int(blob["step"]), json.loads((path / "state.json").read_text())
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path / 'state.json'}: not readable JSON ({type(exc).__name__}: {exc})") from None

    @staticmethod
    def _sharded_state(model: nn.Module, opt) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        _resharded(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        msd, osd = get_state_dict(model, [opt])
        return {"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd}
