"""Many processes on PyTorch's own distributed runtime (`torch.distributed`, started by `torchrun`): which process
is which, who owns which volume, and the gathering of a batch sampled in shares.

Data parallelism shares volumes, never splits one: volume k belongs to rank k mod world_size, and because its
noise is keyed by its own seed (Philox) and pydiffmed's models compute every sample alike, it comes out the same
whichever rank samples it and whatever else that rank samples with it (on the CPU bit for bit; on CUDA within the
libraries' batch-size-dependent rounding: see README "Determinism").
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

if torch.distributed.is_available():
    # torch.distributed.nn.functional binds the default process group as a default argument (group=group.WORLD)
    # when it is imported, and torch imports it with torch._dynamo, which the first call of a custom op loads.
    # Imported after init_process_group, those defaults keep the group alive past destroy_process_group: its
    # gloo threads are then never joined, and one that releases a tensor while the interpreter shuts down aborts
    # the process ("terminate called without an active exception"). Imported here, at `import pydiffmed`, before
    # any group exists, the defaults are None (README, "Many processes": import pydiffmed before
    # init_process_group).
    import torch.distributed.nn  # noqa: F401


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank r of world_size processes, local_rank on its node."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, k: int) -> bool:
        return k % self.world_size == self.rank

    def share(self, items):
        """The items (a sequence in a fixed order, the same on every rank) this rank owns: every world_size-th."""
        return list(items)[self.rank::self.world_size]


def _env_int(name, environ):
    text = environ.get(name)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise RuntimeError(f"torchrun environment: {name}={text!r} is not an integer") from None


def world_from_env(environ=None) -> World:
    """The World that torchrun's environment variables describe; World() (one process) outside torchrun."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return World()
    rank, world_size = _env_int("RANK", environ), _env_int("WORLD_SIZE", environ)
    local_rank = _env_int("LOCAL_RANK", environ) if "LOCAL_RANK" in environ else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeError(f"torchrun environment: RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    return World(rank, world_size, local_rank)


def current_world(group=None) -> World:
    """The World of an initialised process group (World() when torch.distributed is not initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = os.environ.get("LOCAL_RANK")
    rank = dist.get_rank(group)
    return World(rank, dist.get_world_size(group), int(local) if local and local.isdigit() else rank)


def device_for(world: World, device: torch.device) -> torch.device:
    """A CUDA device without an index means the rank's own GPU (cuda:LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and device.index is None and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def init_process_group(world: World, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join torchrun's process group (NCCL for CUDA devices, gloo otherwise) unless already joined."""
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support; run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def leave() -> None:
    """Leave the process group joined by init_process_group (nothing when none is joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, world: World):
    """rank 0's obj on every rank (a small picklable object: a list of indices, a message)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ok(ok: bool, message: str, world: World) -> list[str]:
    """Every rank's message where its ok is False (an empty list: all ranks are fine). A collective: every rank
    must call it, so a rank that hits a problem can report it instead of leaving the others waiting."""
    if not world.distributed:
        return [] if ok else [message]
    import torch.distributed as dist

    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, None if ok else f"rank {world.rank}: {message}")
    return [m for m in gathered if m is not None]


def gather_batch(local: torch.Tensor, indices, batch: int, world: World, group=None) -> torch.Tensor:
    """Reassemble a batch sampled in shares: `local` holds this rank's samples `indices` (sample k of the batch at
    local[i] for k = indices[i]); returns the whole batch, in order, on every rank."""
    import torch.distributed as dist

    per_rank = -(-batch // world.world_size)
    padded = local.new_zeros((per_rank,) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world.world_size)]
    dist.all_gather(pieces, padded, group=group)
    out = local.new_empty((batch,) + tuple(local.shape[1:]))
    for rank, piece in enumerate(pieces):
        for i, k in enumerate(range(rank, batch, world.world_size)):
            out[k] = piece[i]
    return out


__all__ = ["World", "all_ok", "broadcast_object", "current_world", "device_for", "gather_batch",
           "init_process_group", "leave", "world_from_env"]
