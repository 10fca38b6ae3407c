"""Many processes under torchrun: who this process is, its device and threads, and the few
messages the processes exchange.

``torchrun --nproc_per_node=N -m vqcli encode ...`` starts N processes and tells each its place
in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the
rendezvous address); across nodes, torchrun's ``--nnodes`` and ``--rdzv-*`` options do the same.
Each process takes its own share of the inputs (``vqcli.shards``) and works alone; they talk only
at the start (all must have found the same inputs; ``--sample`` without ``--seed`` uses rank 0's
seed) and at the end (per-process summaries gathered, so that rank 0 prints the whole run's
summary and exits with its code).

Decisions:

- Only small Python objects cross processes, never tensors, so the process group is always
  ``gloo`` (CPU, TCP): it needs no GPU memory and no device binding, and works the same on CPU
  and CUDA machines. The GPUs never wait on each other.
- On CUDA, a device given without an index (``auto``, ``cuda``) becomes ``cuda:LOCAL_RANK``
  (modulo the number of GPUs, with a warning when processes must share one); an explicit
  ``cuda:K`` is kept.
- CPU threads: torchrun sets ``OMP_NUM_THREADS=1`` for every process it starts, which would
  leave most cores idle; each process gets ``cores // LOCAL_WORLD_SIZE`` threads instead, unless
  ``OMP_NUM_THREADS`` was set to more than 1. (Threads matter for the result's last bits on the
  CPU: some convolutions round differently with another number of threads. A single process run
  with as many threads as each rank gives the same bits.)
- Processes wait for each other at the end for up to ``VQCLI_DIST_TIMEOUT`` seconds (default one
  day): shares are balanced, but not to the second.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vqcli.errors import UsageError, VqcliError, first_line

log = logging.getLogger(__name__)
TIMEOUT_ENV = "VQCLI_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class Context:
    """This process's place among the processes of one run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        """More than one process: shares, and messages between them."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that prints the progress and the summary."""
        return self.rank == 0


def context_from_env(env: Mapping[str, str] | None = None) -> Context:
    """The ``Context`` torchrun's variables describe (one process when they are absent)."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        text = env.get(name)
        if text is None or text == "":
            return default
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"the environment variable {name}={text!r} is not a whole number") from None

    world = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    local_rank = number("LOCAL_RANK", 0)
    local_world = number("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a torchrun job")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise UsageError(f"LOCAL_RANK={local_rank} and LOCAL_WORLD_SIZE={local_world} do not fit together")
    return Context(rank, world, local_rank, local_world)


def timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def start(ctx: Context) -> None:
    """Join the run's process group (only when there are several processes)."""
    import torch.distributed as dist

    if not ctx.active or dist.is_initialized():
        return
    if not dist.is_available():
        raise VqcliError("this PyTorch build has no torch.distributed; run one process per job with --shard I/N")
    try:
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world, timeout=timeout())
    except (RuntimeError, ValueError, OSError) as e:
        raise VqcliError(f"cannot join the other processes of this torchrun job ({first_line(e)})") from None


def stop(ctx: Context) -> None:
    import torch.distributed as dist

    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def place(ctx: Context, device: torch.device) -> torch.device:
    """This process's device: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``."""
    if device.type != "cuda" or device.index is not None or ctx.local_world == 1:
        return device
    count = torch.cuda.device_count()
    if ctx.local_world > count:
        log.warning(
            "%d processes on this node share %d GPU(s): start at most one process per GPU (--nproc_per_node=%d)",
            ctx.local_world, count, count,
        )
    device = torch.device("cuda", ctx.local_rank % count)
    torch.cuda.set_device(device)
    return device


def split_threads(ctx: Context, env: Mapping[str, str] | None = None) -> int | None:
    """Give this process its part of the CPU cores (see the module); the number set, or None."""
    env = os.environ if env is None else env
    if ctx.local_world == 1:
        return None
    asked = env.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) > 1:
        return None
    threads = max(1, cpu_count() // ctx.local_world)
    torch.set_num_threads(threads)
    return threads


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def all_gather(ctx: Context, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def from_main(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj``, on every process."""
    if not ctx.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    """Wait until every process is here."""
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()


def wait_for_exit(pids: list[int], seconds: float) -> None:
    """Wait (at most ``seconds``) until the processes ``pids`` of this machine have ended."""
    deadline = time.monotonic() + seconds
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # ended, not yet reaped: "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def check_same(ctx: Context, value: Any, message: str) -> None:
    """A ``VqcliError`` with ``message`` (on every process) unless all processes hold ``value``."""
    values = all_gather(ctx, value)
    if any(v != values[0] for v in values):
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise VqcliError(f"{message} (ranks {', '.join(map(str, differing))} differ from rank 0)")


