"""Processes, devices and collectives.

One :class:`DistContext` describes this process: its rank, the world, the
device it trains on and how many processes share its machine. It is built
once, from whichever launcher started us: torchrun (``RANK``/``WORLD_SIZE``),
SLURM (``SLURM_PROCID``), the original's ``--world-size/--dist-url/--rank``,
or our own spawn of one process per visible GPU. No other module reads these
environment variables or calls ``.cuda()``.
"""
import datetime
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .errors import JobFailed, UsageError
from .network import choose_gloo_interface


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class LaunchPlan:
    """How this process joins the job, read from the environment and the flags."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    init_method: Optional[str]

    @property
    def machines(self) -> int:
        """How many machines the job spans: ranks come ``local_world_size`` to a machine."""
        return -(-self.world_size // max(self.local_world_size, 1))


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wants_cuda(args) -> bool:
    if args.gpu is not None:
        return True
    if args.device is not None:
        return args.device.startswith("cuda")
    return visible_gpus() > 0


def launched_externally() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def under_slurm() -> bool:
    return "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def should_spawn(args) -> bool:
    """Several visible GPUs, no launcher, no single --gpu: one process per GPU, as the original's users expect."""
    return (
        not launched_externally()
        and not under_slurm()
        and args.gpu is None
        and (args.device in (None, "cuda"))
        and visible_gpus() > 1
    )


def plan_from_environment(args, spawned_index: Optional[int] = None) -> LaunchPlan:
    if spawned_index is not None:
        gpus = visible_gpus()
        nodes = max(args.world_size, 1)
        node_rank = max(args.rank, 0)
        url = args.dist_url or "tcp://127.0.0.1:29500"
        return LaunchPlan(node_rank * gpus + spawned_index, nodes * gpus, spawned_index, gpus, url)
    if launched_externally():
        world = int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return LaunchPlan(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), local_world, "env://")
    if under_slurm():
        world = int(os.environ["SLURM_NTASKS"])
        local_world = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0])
        url = args.dist_url
        if url is None:
            if "MASTER_ADDR" not in os.environ:
                raise UsageError("under SLURM with several tasks, set MASTER_ADDR/MASTER_PORT or pass --dist-url tcp://HOST:PORT")
            url = "env://"
            os.environ.setdefault("MASTER_PORT", "29500")
        return LaunchPlan(int(os.environ["SLURM_PROCID"]), world, int(os.environ.get("SLURM_LOCALID", 0)), local_world, url)
    if args.world_size > 1:
        if args.dist_url is None or args.rank < 0:
            raise UsageError("--world-size > 1 needs --dist-url tcp://HOST:PORT and this process's --rank")
        return LaunchPlan(args.rank, args.world_size, 0, 1, args.dist_url)
    return LaunchPlan(0, 1, 0, 1, None)


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device`` of the scripts: the named device, or cuda when available, else cpu; a bad name is a UsageError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def choose_device(args, local_rank: int) -> torch.device:
    if not wants_cuda(args):
        if args.device not in (None, "cpu"):
            raise UsageError(f"--device {args.device!r}: use cpu, cuda or cuda:N")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("a GPU was asked for (--gpu/--device cuda) but CUDA is not available here: use --device cpu")
    if args.gpu is not None:
        index = args.gpu
    elif args.device and ":" in args.device:
        index = int(args.device.split(":", 1)[1])
    else:
        index = local_rank % visible_gpus()
    if index >= visible_gpus():
        raise UsageError(f"GPU {index} asked for, but only {visible_gpus()} visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(args, spawned_index: Optional[int] = None) -> DistContext:
    """Join the process group (if any) and return this process's context."""
    plan = plan_from_environment(args, spawned_index)
    device = choose_device(args, plan.local_rank)
    if plan.world_size > 1:
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        # A dead or stuck peer must fail the job after this long, not hang it for ever.
        timeout = datetime.timedelta(minutes=args.dist_timeout)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        master = master_address(plan.init_method)
        if "gloo" in backend and master is not None:
            choose_gloo_interface(*master, plan.machines)
        try:
            store = attempt_store(plan, timeout)
            dist.init_process_group(
                backend=backend, init_method=None if store is not None else plan.init_method, store=store,
                world_size=plan.world_size, rank=plan.rank, timeout=timeout,
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as error:
            if not (isinstance(error, dist.DistError) or is_lost_peer(error)):
                raise
            where = f"the master at {master[0]}:{master[1]}" if master is not None else "the other processes"
            raise JobFailed(f"rank {plan.rank} could not join the job through {where} ({one_line(error)}): "
                            f"{join_advice(plan, args.dist_timeout)}") from error
    return DistContext(rank=plan.rank, world_size=plan.world_size, local_rank=plan.local_rank,
                       local_world_size=plan.local_world_size, device=device)


def attempt_store(plan: LaunchPlan, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """torchrun's store under keys of this start of the group alone, where one torchrun starts every process.

    torchrun keeps one store for the whole job, and torch does not keep a restarted group's keys apart
    from those of the group before it: the new group would read the dead one's addresses (gloo dials a
    process that has exited) and counters. One torchrun counts its restarts for all its processes, so the
    count names the group. Across machines each torchrun counts its own, and a store per start
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) is the way: see ``join_advice``.
    """
    if plan.init_method != "env://" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if plan.local_world_size != plan.world_size:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), plan.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/eca/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def join_advice(plan: LaunchPlan, dist_timeout: float) -> str:
    """What to check when this process could not join the group."""
    advice = (f"check that every node was started within --dist-timeout ({dist_timeout:g} min) and that the "
              "address is one they all reach")
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and plan.local_world_size != plan.world_size
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
        # Each machine's torchrun counts its own restarts, so no count names the group (see attempt_store).
        advice += ("; where torchrun restarted the group, it may have read the dead group's keys in torchrun's "
                   "shared store: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (c10d rendezvous) "
                   "so that each start gets a store of its own")
    return advice


def master_address(init_method: Optional[str]):
    """(host, port) the store lives at, from ``env://`` (MASTER_ADDR/MASTER_PORT) or ``tcp://HOST:PORT``; else None."""
    if init_method == "env://":
        if "MASTER_ADDR" not in os.environ:
            return None
        return os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500"))
    parsed = urllib.parse.urlsplit(init_method or "")
    if parsed.scheme != "tcp" or not parsed.hostname:
        return None
    return parsed.hostname, parsed.port or 29500


def one_line(error: BaseException) -> str:
    """An error's message on one line, without the C++ source paths and stack frames torch appends."""
    first = str(error).split("\nException raised from")[0]
    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", " ".join(first.split()))[:300]


# gloo's messages for a peer that closed its connection or stopped answering, as they appear without the transport's path.
GLOO_PEER_FAILURES = ("Application timeout caused pair closure", "Connection closed by peer", "Connection reset by peer")


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process died or stopped answering.

    NCCL and the store raise ``DistError`` subclasses; gloo raises a plain
    RuntimeError that usually names its transport ("[.../gloo/transport/tcp/pair.cc:534]
    Connection reset by peer", "Timed out waiting ... for recv") but not
    always: a timeout that hits DDP's parameter broadcast reads just
    "Application timeout caused pair closure".
    """
    if isinstance(error, dist.DistError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("gloo" in message or any(
        phrase in message for phrase in GLOO_PEER_FAILURES
    ))


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on at least one (a stop request, say)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
