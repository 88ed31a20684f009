"""Data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``) for DSAForCausalLM.

Every rank holds a 1/N shard of each parameter, gradient and optimizer state (DTensors on
a one-dimensional DeviceMesh). A decoder layer's parameters are all-gathered for its
forward and again for its backward, and its gradients reduce-scattered (averaged) right
after; the embedding, final norm and LM head form the root's group. Every rank reads
``batch_size / N`` of the step's windows (:func:`local_rows`): the losses are means over
equal token counts, so the averaged gradient is the single-process gradient of the whole
batch. Checkpoints go through torch.distributed.checkpoint (:func:`save_sharded`,
:func:`load_sharded`): each rank writes its shards, and any number of ranks, one process
without a process group included, reads them back.
"""
from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def init_from_env(device_type: str | None = None) -> tuple[DeviceMesh, torch.device]:
    """Join the process group torchrun (or :func:`launch`) describes in the environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on GPUs, gloo on CPUs.
    Returns the one-dimensional data-parallel mesh and this rank's device (``cuda:LOCAL_RANK``)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",)), device


def mixed_precision(device: torch.device | str) -> MixedPrecisionPolicy:
    """bf16 parameters in forward and backward, fp32 gradient reduction on GPUs; fp32
    throughout on CPUs (where the sharded run then matches the single-process one)."""
    if torch.device(device).type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None):
    """``fully_shard`` each decoder layer, then the root (embedding, final norm, LM head),
    in place; returns ``model``. ``mp_policy`` defaults to :func:`mixed_precision` of the
    mesh's device. Frozen parameters (the warm-up stage's) stay sharded and get no gradient."""
    mp_policy = mp_policy or mixed_precision(mesh.device_type)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def local_rows(batch: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's contiguous ``batch_size / N`` rows of a step's ``[batch_size, ...]`` batch."""
    n, rank = mesh.size(), mesh.get_local_rank()
    if batch.shape[0] % n:
        raise ValueError(f"batch_size: {batch.shape[0]} windows do not split evenly over {n} ranks")
    return batch.chunk(n)[rank]


def mean_over_ranks(values: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The mean over ranks of ``values`` (the logged losses: each rank's is a mean over
    equally many tokens, so this is the whole batch's)."""
    values = values.detach().clone()
    dist.all_reduce(values, group=mesh.get_group())
    return values / mesh.size()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """What a checkpoint holds: ``"model"`` (and ``"optim"``), as DCP reads and writes them."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    return dict(zip(("model", "optim"), get_state_dict(model, optimizer)))


def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Write ``model`` (and ``optimizer``) with torch.distributed.checkpoint to the
    directory ``path``: keys ``"model"`` and ``"optim"``, parameters under their
    ``model.state_dict()`` names, each rank writing its own shards. Collective."""
    dcp.save(_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Read :func:`save_sharded`'s directory into ``model`` (and ``optimizer``), in place,
    whatever the number of ranks that wrote it: a sharded model on any mesh, or a plain
    one in a single process without a process group (dcp.load's warning that it then
    loads alone, as meant, is silenced)."""
    state = _state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": state["model"]}, checkpoint_id=str(path))
        if optimizer is not None:
            # A parameter that never had a gradient (the dense stage's indexers) has no
            # optimizer state in the file: it keeps the fresh state get_state_dict made.
            dcp.load({"optim": state["optim"]}, checkpoint_id=str(path),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer or (), model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's plain CPU tensors on rank 0 (empty on the other ranks). Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, **kwargs) -> None:
    """flashdsa's safetensors export (:func:`flashdsa.checkpoint.save_pretrained`) of a
    sharded model: rank 0 gathers the full weights into a plain model and writes ``path``.
    Collective."""
    from ..model import DSAForCausalLM
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        plain = DSAForCausalLM(model.config, init=False)
        plain.load_state_dict(state)
        plain.reset_buffers()
        plain.save_pretrained(Path(path), **kwargs)
    dist.barrier()


def data_mesh(model: torch.nn.Module) -> DeviceMesh | None:
    """The mesh ``model`` is sharded on (:func:`shard_model`), None for a plain model."""
    return next(model.parameters()).device_mesh if isinstance(model, FSDPModule) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group() -> None:
    """Wait for every rank, then destroy the default process group: a rank that tears the
    group down while another is still in a collective can abort that rank's gloo threads."""
    dist.barrier()
    dist.destroy_process_group()


def _run_rank(rank: int, nproc: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))   # the host's cores shared among the ranks
    fn(*args)


def launch(fn, nproc: int, *args, timeout: float | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes on this host, with the environment
    torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR 127.0.0.1, a free
    MASTER_PORT), so that :func:`init_from_env` joins them. ``fn`` must be importable by name
    (the processes are spawned). A rank's exception is raised here; past ``timeout`` seconds
    the processes are killed and TimeoutError raised."""
    if nproc < 1:
        raise ValueError(f"nproc: expected >= 1, got {nproc}")
    ctx = mp.start_processes(_run_rank, args=(nproc, _free_port(), fn, args), nprocs=nproc, join=False,
                             start_method="spawn")
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.join(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0)):
        if deadline is not None and time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
                proc.join()
            raise TimeoutError(f"timeout: {nproc} processes running {fn.__name__} still ran after {timeout} s")


def load_full(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict):
    """Load one process's ``model.state_dict()`` and ``optimizer.state_dict()`` (a plain
    run's train_state.pt) into the sharded ``model`` and its ``optimizer``, in place; the
    optimizer's parameter groups must list the parameters as the plain run's did."""
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    # a plain optimizer state dict numbers the parameters in the order of its groups
    optim_state = {"state": {fqns[i]: s for i, s in optim_state["state"].items()},
                   "param_groups": [dict(g, params=[fqns[i] for i in g["params"]]) for g in optim_state["param_groups"]]}
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    # not strict: a parameter that never had a gradient (the dense stage's indexers) has no state
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True, strict=False))
