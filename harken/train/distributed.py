"""Process-group setup for torchrun: gloo on CPU, NCCL on CUDA, chosen automatically.

``harken train`` runs unchanged alone or under ``torchrun`` (``python -m torch.distributed.run``):
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment and
``init_distributed`` joins that group. Every collective the trainer issues goes through the helpers
here, and a failed collective (a peer died, hung, or the network broke) is turned into a
``PeerLostError`` whose message says which rank saw it, what failed, and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("harken")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    timeout_s: float = 1800.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class PeerLostError(RuntimeError):
    """A collective failed or timed out: some other rank is gone or stuck."""


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun described in the environment (no-op when run alone).

    ``device`` must already be the rank's own device (``cuda:LOCAL_RANK`` on GPUs, set current
    before this call so NCCL binds the right GPU). ``timeout_s`` bounds every collective: a rank
    that waits longer for a peer fails with a clear error instead of hanging forever.
    """
    rank, world, local = env_world()
    if world <= 1:
        return DistInfo(timeout_s=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps its store across restarts: without a per-attempt prefix, a restarted
            # worker can read the dead previous workers' gloo addresses and fail to connect
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                 is_master=False, timeout=timeout)
            kwargs.update(store=dist.PrefixStore(f"harken/attempt_{attempt}", base), rank=rank, world_size=world)
        try:
            dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        except Exception as e:  # rendezvous or store failure: name the endpoint
            raise PeerLostError(
                f"rank {rank}/{world} on {socket.gethostname()}: could not join the {backend} process group at "
                f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} within {timeout_s:.0f} s "
                f"({type(e).__name__}: {e}). Check that every node runs the same torchrun command with the same "
                f"--rdzv-endpoint/--rdzv-id and that the port is reachable.") from e
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend, timeout_s=timeout_s)


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    msg = str(e).lower()
    return any(k in msg for k in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                                  "timed out", "timeout", "peer", "socket", "watchdog"))


@contextlib.contextmanager
def collective(info: DistInfo, what: str):
    """Run a block containing collectives; turn a communication failure into ``PeerLostError``."""
    if not info.enabled:
        yield
        return
    try:
        yield
    except PeerLostError:
        raise
    except (RuntimeError, OSError) as e:
        if not _is_comm_error(e):
            raise
        _drop_broken_group(info)
        raise PeerLostError(
            f"rank {info.rank}/{info.world_size} on {socket.gethostname()}: '{what}' failed "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}). Another rank probably died or hung: "
            f"torchrun's failure summary names the first rank that failed (its log has the real cause). "
            f"Under `torchrun --max-restarts N` the job restarts by itself and resumes from the newest checkpoint "
            f"in train.exp_dir; otherwise run the same command again. If a rank is only slow (a long checkpoint "
            f"write, rank 0 evaluating), raise train.dist_timeout_s (now {info.timeout_s:.0f} s).") from e


def _drop_broken_group(info: DistInfo) -> None:
    """Tear a gloo group down right after a lost peer, while the process is still well.

    The group is useless once a peer is gone. Left to the interpreter's shutdown, gloo's threads
    are destroyed while still joinable and the process dies of SIGABRT ("terminate called without
    an active exception") instead of exiting with its own status: seen in about 1 run in 6 on a
    loaded host, never after an explicit teardown. NCCL groups are left to NCCL's watchdog (its
    destroy can block on a dead peer).
    """
    if info.backend != "gloo" or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as e:  # the error being raised matters more than a failed teardown
        log.debug("tearing down the broken gloo group failed: %s", e)


def all_reduce_sum(t: torch.Tensor, info: DistInfo, what: str = "all_reduce") -> torch.Tensor:
    """Sum ``t`` over ranks in place. On NCCL the tensor travels through the GPU."""
    if info.enabled:
        with collective(info, what):
            if info.backend == "nccl":
                g = t.cuda()
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                t.copy_(g.cpu())
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo, what: str = "barrier") -> None:
    if info.enabled:
        with collective(info, what):
            if info.backend == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


def broadcast_object(obj, info: DistInfo, what: str = "broadcast", src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (small picklable objects only)."""
    if not info.enabled:
        return obj
    box = [obj]
    with collective(info, what):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj, info: DistInfo, what: str = "all_gather_object") -> list:
    """Every rank's ``obj``, in rank order (small picklable objects only)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    with collective(info, what):
        dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
