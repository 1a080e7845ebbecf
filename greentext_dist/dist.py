"""Process-group setup from the launcher's environment (torchrun, deepspeed, accelerate, srun)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = ("torchrun --nproc_per_node N, deepspeed --num_gpus N, accelerate launch, or under SLURM "
             "srun torchrun ... as slurm/train.sbatch does")


def check_launch_environment(env=None) -> None:
    """Several copies started without ranks (srun or mpirun running plain python) would each train alone into
    the same folder; a WORLD_SIZE without a rendezvous address would hang. Both are refused with the launchers."""
    from greentext_dist.errors import UserError

    env = os.environ if env is None else env
    if "RANK" not in env:
        for var, who in (("SLURM_STEP_NUM_TASKS", "srun"), ("OMPI_COMM_WORLD_SIZE", "mpirun"), ("PMI_SIZE", "an MPI launcher")):
            n = int(env.get(var, "1") or 1)
            if n > 1:
                raise UserError(f"{who} started {n} copies of this script without a distributed environment (no RANK/WORLD_SIZE): "
                                f"they would train {n} separate models into one folder", f"launch with {LAUNCHERS}")
    if int(env.get("WORLD_SIZE", "1")) > 1 and not env.get("MASTER_ADDR"):
        raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but MASTER_ADDR is not, so the ranks cannot meet",
                        f"let a launcher set both: {LAUNCHERS}")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


_ours: dict[str, str] = {}  # environment variables init_distributed set, taken back by shutdown()
_destroy = None  # how shutdown() ends the group, where a library keeps references of its own to it (destroy_with)


def destroy_with(fn) -> None:
    """End this run's process group with `fn` instead of torch's destroy_process_group: DeepSpeed caches groups made
    from it, and a second run in the same process (the Python API) would use them after the group is gone."""
    global _destroy
    _destroy = fn


def _set_env(key: str, value: str) -> None:
    if key not in os.environ:
        os.environ[key] = _ours[key] = value


def backend_for(device: torch.device) -> str:
    """NCCL for GPU tensors with gloo beside it for CPU tensors, in one group: FSDP's CPU offload keeps gradients on the
    CPU, and its gradient-norm all-reduce fails on NCCL alone ("No backend type associated with device type cpu",
    pytorch#148532); the loop's stop vote is a CPU all-reduce too (signals.py). gloo picks its network interface
    from GLOO_SOCKET_IFNAME (slurm/train.sbatch sets it with NCCL_SOCKET_IFNAME)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(timeout_s: int = 1800, single_rank_group: bool = False) -> DistEnv:
    """single_rank_group: start a one-rank group under plain `python` (DeepSpeed needs a process group)."""
    check_launch_environment()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif world_size == 1 and not single_rank_group and mps_available():
        device = torch.device("mps")  # Apple GPUs: one process with the plain engine (DeepSpeed and FSDP need CUDA or CPU)
    else:
        device = torch.device("cpu")
        _set_env("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for GPUs and warn on every import
    if world_size == 1 and single_rank_group and not dist.is_initialized():
        for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", None), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            _set_env(k, v or str(_free_port()))
    if (world_size > 1 or single_rank_group) and not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device), rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return DistEnv(rank, world_size, local_rank, device)


def preflight(env: DistEnv, timeout_s: float = 60.0) -> dict:
    """Before any model loads: every rank reports its host and device in one collective, so a broken node
    or fabric fails here in seconds instead of in the first gradient all-reduce after the NCCL watchdog."""
    import socket

    gpu = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None
    me = {"rank": env.rank, "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "gpu": gpu}
    if not env.distributed:
        return {"nodes": 1, "ranks_per_node": [1], "gpus": [me["gpu"]] if me["gpu"] else []}
    ok = torch.ones(1, device=env.device)
    req = dist.all_reduce(ok, async_op=True)
    if not req.wait(timeout=datetime.timedelta(seconds=timeout_s)) or ok.item() != env.world_size:
        raise RuntimeError(f"preflight all-reduce failed on rank {env.rank}: check the node's network and GPUs")
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, me)
    hosts = {}
    for r in everyone:
        hosts.setdefault(r["host"], []).append(r)
    return {"nodes": len(hosts), "ranks_per_node": [len(v) for v in hosts.values()],
            "gpus": [r["gpu"] for r in everyone if r["gpu"]], "hosts": list(hosts)}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process as it was: no process group, and none of the variables a one-rank group set (a process
    started later from this one, or a second `train(...)` call, would otherwise take its MASTER_PORT)."""
    global _destroy
    if dist.is_initialized():
        (_destroy or dist.destroy_process_group)()
    _destroy = None
    while _ours:
        key, value = _ours.popitem()
        if os.environ.get(key) == value:
            del os.environ[key]


def on_main(fn, *args, **kwargs):
    """Run fn on rank 0 only and hand its result (or its UserError) to every rank, so no rank is left waiting."""
    from greentext_dist.errors import UserError

    result = error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            error = (e.problem, e.fix)
    result, error = broadcast_object((result, error))
    if error:
        raise UserError(*error)
    return result


def everywhere(fn, *args, **kwargs):
    """Run fn on every rank; a UserError on any rank is raised on all of them, so none is left waiting."""
    from greentext_dist.errors import UserError

    result = error = None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        error = (e.problem, e.fix)
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(*error)
    return result


def gather(value) -> list:
    """Every rank's `value`, in rank order (a list of one without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_same(value: str, what: str, fix: str) -> None:
    """Every rank must hold the same `value`; otherwise a UserError on every rank, naming the first that differs."""
    from greentext_dist.errors import UserError

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    odd = next((r for r, v in enumerate(values) if v != values[0]), None)
    if odd is not None:
        raise UserError(f"{what} differs between ranks: rank 0 has {values[0]}, rank {odd} has {values[odd]}", fix)


def check_shared_folder(folder, flag: str, required: bool = True, wait_s: float = 10.0) -> bool:
    """Does every rank see the folder rank 0 writes? rank 0 writes a file of random content there and every rank
    reads it (a shared file system may take a moment to show it: each looks for up to `wait_s`). A node-local disk
    at the same path on another node (/tmp, /local/scratch) would otherwise be found at the first save, half an hour
    in, or as a raw FileNotFoundError on resume. `required`: a UserError naming the ranks and hosts that cannot see
    it; else a warning, and False."""
    import logging
    import secrets
    import socket
    import time
    from pathlib import Path

    from greentext_dist.errors import UserError

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    folder = Path(folder)
    name = broadcast_object(f".shared-{secrets.token_hex(8)}" if dist.get_rank() == 0 else None)
    probe = folder / name
    if dist.get_rank() == 0:
        probe.write_text(name)
    barrier()
    seen, t0 = False, time.monotonic()
    while not seen:
        try:
            seen = probe.read_text() == name
        except OSError:
            pass
        if seen or time.monotonic() - t0 > wait_s:
            break
        time.sleep(0.2)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (os.environ.get("SLURMD_NODENAME") or socket.gethostname(), seen))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [(r, host) for r, (host, ok) in enumerate(everyone) if not ok]
    if not blind:
        return True
    hosts = sorted({h for _, h in blind})
    ranks = ", ".join(str(r) for r, _ in blind[:8]) + (f" and {len(blind) - 8} more" if len(blind) > 8 else "")
    problem = (f"{flag} {folder} is not the same folder on every node: rank(s) {ranks} on {', '.join(hosts[:4])}"
               f"{' ...' if len(hosts) > 4 else ''} cannot see what rank 0 on {everyone[0][0]} wrote there (a node-local disk at that path?)")
    if required:
        raise UserError(problem, f"put {flag} on a file system every node mounts (a shared scratch or home folder), not a node-local one")
    logging.getLogger("greentext_dist").warning(problem + f": each node works in its own copy. Put {flag} on a shared file system to share it.")
    return False
