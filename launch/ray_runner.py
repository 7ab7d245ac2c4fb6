"""Run the core loop under Ray Train.

``scaling.num_workers >= 1`` runs ``plait.core.loop.fit`` in that many ``TorchTrainer``
workers (DDP or FSDP, a distributed sampler, metrics summed across workers, rank 0 writing the
run folder, one progress bar drawn by the driver); ``num_workers: 0`` uses Ray Train's local mode, the same API in
this process without starting Ray.

Checkpoints are plait's own (``runs/<name>/checkpoints``, written by rank 0): Ray's local
mode keeps no checkpoint, and one format means ``plait eval`` and resuming work the same
either way. When Ray restarts a failed worker group (``scaling.max_failures``), the
restarted workers resume from that folder, so on a multi-node cluster ``run.runs_dir``
must be storage that every node sees: a shared mount or a storage URI (``launch/storage.py``).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from plait.core import checkpoint
from plait.core.config import FsdpSettings, PlaitConfig, ScalingSettings
from plait.core.distributed import DataReplicas, Distributed, sync_buffers
from plait.core.errors import ConfigError, PlaitError, PluginError
from plait.core.loop import fit
from plait.core.manager import Plugins
from plait.core.model import leaves_parameters_unused
from plait.core.parallel import Mesh, MeshShape, build_mesh, expert_parallel, mesh_shape, shard, tensor_parallel
from plait.core.runs import prepare
from plait.launch.progress import ProgressForwarder, send_nowait, show_progress
from plait.launch.storage import RemoteRuns, StorageSync, is_uri, staging_dir

# An embedding at least this large sends sparse gradients (the rows a batch used) through DDP:
# the 30,522-row text vocabulary is half the default model's parameters, but a batch touches a
# few hundred rows, and on CPU the all-reduce of its dense gradient cost ~5% of the 2-worker speed.
SPARSE_EMBEDDING_ROWS = 1024


def sparse_embedding_gradients(model: torch.nn.Module) -> list[str]:
    """Switch large embeddings to sparse gradients; ``fit`` densifies them before clipping and
    the optimizer, so the update is the dense one. An embedding whose weight an output layer
    reuses (``weight_tied = True`` on it, as ``wiki_lm`` sets) gets a dense gradient from that
    layer and stays dense. Returns the switched modules' names."""
    switched = []
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Embedding) and module.num_embeddings >= SPARSE_EMBEDDING_ROWS
                and not getattr(module, "weight_tied", False)):
            module.sparse = True
            switched.append(name)
    return switched


def shard_model(model: torch.nn.Module, settings: FsdpSettings | None = None, mesh: Any = None) -> torch.nn.Module:
    """FSDP2 (``plait.core.parallel.shard``): the declared blocks, each encoder and the fusion module
    are units of their own (``scaling.fsdp.units``), the head stays with the root. A worker holds
    1/world_size of the weights, gradients and optimizer state, and gathers one unit's weights at a
    time for its forward and backward.

    Ray Train's ``prepare_model`` runs its FSDP on GPUs only; this runs on CPUs too (gloo)."""
    shard(model, settings or FsdpSettings(), mesh)
    # Every worker must issue the same gathers and reduce-scatters in the same order:
    if hasattr(model, "idle_encoders"):
        cast(Any, model).idle_encoders = "run"  # an encoder runs even where a batch lacks its modality
    cast(Any, model).set_reduce_scatter_unused_params(True)  # a weight unused in one worker's step sends zeros
    model.register_forward_pre_hook(broadcast_buffers)
    return model


def worker_distributed(config: PlaitConfig, rank: int, world_size: int,
                       device: torch.device) -> tuple[Distributed, dict[str, torch.nn.Module]]:
    """How ``fit`` runs on this worker of an initialised process group: the mesh ``scaling`` asks for, tensor
    and expert parallelism on it, then DDP or FSDP2 over the data replicas, and their samplers. Also returns
    where the model, once prepared, is kept (for an error that names its parameters)."""
    strategy = config.scaling.strategy
    shape = (mesh_shape(config.scaling, config.source, config.run.checkpoint_format, world_size) if world_size > 1
             else MeshShape())
    mesh = build_mesh(shape, device)
    prepared: dict[str, torch.nn.Module] = {}

    def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
        prepared["model"] = model
        if shape.data == 1:  # one process, or one tensor-parallel group: no replicas to keep in step
            return model
        if strategy == "fsdp":
            return shard_model(model, config.scaling.fsdp, mesh.data)
        unused = find_unused_parameters(model, config.scaling.find_unused_parameters)
        sparse_embedding_gradients(model)
        if shape.expert > 1:
            keep_experts_out_of_ddp(model)
        # what Ray Train's prepare_model(parallel_strategy="ddp") does, without needing its worker context
        return torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused, gradient_as_bucket_view=True)

    dist = Distributed(
        rank=rank, world_size=world_size, parallelize=lambda model: parallelize(model, mesh),
        prepare_model=prepare_model,
        prepare_loader=lambda loader, add_sampler: replica_loader(loader, add_sampler, dist, config.run.seed,
                                                                  always=config.scaling.elastic),
        reduce_gradients=lambda model: reduce_expert_gradients(model, mesh),
        device=device, lockstep=world_size > 1 and (strategy == "fsdp" or shape.tensor > 1 or shape.expert > 1),
        tensor_parallel=shape.tensor,
    )
    return dist, prepared


def parallelize(model: torch.nn.Module, mesh: Mesh) -> torch.nn.Module:
    """Tensor parallelism (each module's own plan) and expert parallelism (each MoE layer keeps its share of
    the experts) on this worker's meshes; the names of what was split go to the log."""
    if mesh.tensor is not None:
        split = tensor_parallel(model, mesh.tensor)
        logging.getLogger("plait").info("tensor parallelism over %d workers: %d submodules split",
                                        mesh.shape.tensor, len(split))
    if mesh.expert is not None:
        layers = expert_parallel(model, mesh.expert)
        logging.getLogger("plait").info("expert parallelism over %d workers: %d MoE layers split",
                                        mesh.shape.expert, len(layers))
    return model


def split_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that are DTensors before any data-parallel wrapper: split by tensor or expert parallelism."""
    from torch.distributed.tensor import DTensor

    return [(name, p) for name, p in model.named_parameters() if isinstance(p, DTensor)]


def keep_experts_out_of_ddp(model: torch.nn.Module) -> None:
    """DDP all-reduces the weights every worker holds; each worker's experts are its own, and
    ``reduce_expert_gradients`` reduces theirs. Every encoder runs on every batch: an MoE layer in an encoder
    takes part in each all-to-all even where the batch lacks that modality."""
    from torch.nn.parallel import DistributedDataParallel

    if hasattr(model, "idle_encoders"):
        cast(Any, model).idle_encoders = "run"
    names = [name for name, _ in split_parameters(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def reduce_expert_gradients(model: torch.nn.Module, mesh: Mesh) -> None:
    """An expert's gradient arrives (through the all-to-all's backward) summed over the tokens of every worker
    of its expert-parallel group; it becomes DDP's average over all data replicas: summed over the workers
    holding the same experts, divided by the replicas."""
    if mesh.expert is None:
        return
    with torch.no_grad():
        for _, param in split_parameters(getattr(model, "module", model)):
            if param.grad is None:
                continue
            local = cast(Any, param.grad).to_local()
            if mesh.expert_replicas is not None:
                torch.distributed.all_reduce(local, group=mesh.expert_replicas.get_group())
            local.div_(mesh.shape.data)


def replica_loader(loader: Any, add_sampler: bool, replicas: DataReplicas, seed: int, always: bool = False) -> Any:
    """The training loader over the data replicas, as Ray Train's ``prepare_data_loader`` makes it over the
    workers (a ``DistributedSampler``, shuffled by ``run.seed``): the workers of a tensor-parallel group read
    the same batches. Replica r reads positions r, r + n, ... of one shuffled order, whatever the number of
    replicas n, which is what lets an elastic run (``always``: one replica too) resume on another n at the
    same sample (``plait.core.resume.epoch_position``)."""
    from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

    if not add_sampler or (replicas.data_world_size == 1 and not always):  # as one process reads the data
        return loader
    shuffle = not isinstance(loader.sampler, SequentialSampler)
    sampler: DistributedSampler[int] = DistributedSampler(loader.dataset, num_replicas=replicas.data_world_size,
                                                          rank=replicas.data_rank, shuffle=shuffle, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, generator=loader.generator,
                      persistent_workers=loader.num_workers > 0)


def find_unused_parameters(model: torch.nn.Module, setting: str | bool) -> bool:
    """DDP's ``find_unused_parameters``: an extra autograd traversal every step, needed only
    when a step can leave a trainable parameter without a gradient. ``auto`` lets an encoder
    whose modality a batch lacks touch its weights (a zero gradient) instead of skipping them,
    then asks the modules whether any other of theirs can go unused
    (``plait.core.model.leaves_parameters_unused``)."""
    if setting != "auto":
        return bool(setting)
    if hasattr(model, "idle_encoders"):
        cast(Any, model).idle_encoders = "touch"
    return leaves_parameters_unused(model)


def undeclared_unused_parameters(model: torch.nn.Module, ddp_message: str) -> PluginError:
    """DDP's error for a parameter that got no gradient, as one line naming the parameters."""
    import re

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    found = re.search(r"did not receive grad for rank \d+: ([\d ,]+)", ddp_message)
    indices = [int(i) for i in re.findall(r"\d+", found.group(1))] if found else []
    names = [trainable[i] for i in indices if i < len(trainable)]
    which = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "some"
    return PluginError(f"a training step left parameters without a gradient ({which}), and no module declared it "
                       "could (may_leave_parameters_unused = True on the module that bypasses them); set "
                       "scaling.find_unused_parameters=true to run anyway")


def broadcast_buffers(model: torch.nn.Module, args: tuple) -> None:
    """Rank 0's buffers (batch-norm statistics) to every worker before each forward, as DDP
    does: FSDP shards weights only, and workers' statistics would drift apart otherwise."""
    sync_buffers(model)


def worker_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the same ``fit`` as in-process."""
    import ray.train
    import ray.train.torch as ray_torch

    torch.set_num_threads(loop_config["threads"])
    if os.path.isdir(loop_config["cwd"]):  # Ray starts workers in its own folder; relative paths are the user's
        os.chdir(loop_config["cwd"])
    config, plugins = prepare(loop_config["raw"], loop_config["source"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # before a storage URI in run.runs_dir gives way to the local staging folder
    uploads = add_runner_plugins(plugins, config, loop_config.get("progress")) if rank == 0 else None
    if is_uri(config.run.runs_dir):  # train in a local folder filled from storage, rank 0 uploads
        remote = RemoteRuns(config.run.runs_dir, config.source)
        config.run.runs_dir = str(remote.stage(config.run.name, staging_dir(remote.uri, rank)).parent)
    device = ray_torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    if config.scaling.elastic:
        config.run.grad_accumulation = elastic_accumulation(config, world_size)
    dist, prepared = worker_distributed(config, rank, world_size, device)
    if config.data.engine == "ray":
        from plait.launch.ray_data import worker_batches

        dist.train_batches = worker_batches(config, dist.data_rank, dist.data_world_size)
    if loop_config.get("progress") is not None:
        send_nowait(loop_config["progress"], {"worker": {"rank": rank, **where_this_worker_logs()}})
    try:
        state = fit(config, plugins, dist)
    except RuntimeError as exc:
        if "Expected to have finished reduction" not in str(exc):
            raise
        raise undeclared_unused_parameters(prepared["model"], str(exc)) from None
    finally:
        if uploads is not None:
            uploads.drain()
    ray.train.report({"run": state.metrics.get("run", {})})


def elastic_accumulation(config: PlaitConfig, world_size: int) -> int:
    """The gradient accumulation that keeps an elastic run's global batch, ``batch_size x grad_accumulation x
    max workers``, on ``world_size`` workers (so the learning rate and its schedule stay as they are)."""
    total = config.run.grad_accumulation * config.scaling.max_workers
    if total % world_size:
        raise ConfigError(f"{config.source}: scaling.num_workers: {world_size} workers cannot keep the global batch "
                          f"of {total} batches of run.batch_size")
    accumulation = total // world_size
    if config.run.grad_accumulation != accumulation:
        logging.getLogger("plait").info(
            "elastic: %d of %d workers; gradient accumulation %d keeps the global batch of %d samples",
            world_size, config.scaling.max_workers, accumulation, total * config.run.batch_size)
    return accumulation


def check_elastic(config: PlaitConfig) -> None:
    """Refuse an elastic range in which some worker count cannot keep the global batch."""
    import math

    scaling = config.scaling
    if not scaling.elastic:
        return
    total = config.run.grad_accumulation * scaling.max_workers
    odd = [n for n in range(scaling.min_workers, scaling.max_workers + 1) if total % n]
    if odd:
        counts = math.lcm(*range(scaling.min_workers, scaling.max_workers + 1))
        needed = config.run.grad_accumulation * counts // math.gcd(counts, total)
        raise ConfigError(
            f"{config.source}: scaling.num_workers: [{scaling.min_workers}, {scaling.max_workers}]: plait keeps the "
            "global batch by gradient accumulation, so every worker count in the range must divide "
            f"{scaling.max_workers} x run.grad_accumulation = {total}, and {odd[0]} does not; set "
            f"run.grad_accumulation to {needed}")


def add_runner_plugins(plugins: Plugins, config: PlaitConfig, progress: Any) -> StorageSync | None:
    """The runner's own plugins on rank 0, registered like any other so that ``plait plugins
    --order`` lists them: the upload to a remote runs folder (returned, to finish its upload in
    flight when the run fails), and progress for the driver's bar (``progress``: the driver's
    queue, None in Ray's local mode)."""
    uploads = None
    if is_uri(config.run.runs_dir):
        uploads = StorageSync(config.run.runs_dir, config.source)
        plugins.register(uploads, name="plait-storage")
    if progress is not None:
        plugins.register(ProgressForwarder(progress), name="plait-ray-progress")
    return uploads


def where_this_worker_logs() -> dict[str, Any]:
    """This worker's node and log file, for the driver's error if the process dies: Ray sends a
    worker's stderr to a file in its session folder on that node."""
    import ray

    try:
        log = os.readlink("/proc/self/fd/2")  # Linux: what stderr is, as Ray redirected it
    except OSError:
        log = None
    return {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "log": log if log and log.startswith("/") else None}


def connect(address: str | None, verbose: bool) -> str | None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray sized to this machine. Returns
    the address as the user gave it (None: none was given)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return address
    if address:
        check_reachable(address)
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                               "logging_level": logging.INFO if verbose else logging.ERROR}
    try:
        if address:
            ray.init(address=address, **options)
        else:  # "local": a new instance, even when `ray start` left one running on this machine
            # Nobody reads a private instance's metrics or spot-preemption notices, and on a small
            # machine their background polling takes CPU from the workers (and, through DDP's
            # per-step sync, from all of them).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            ray.init(address="local", num_cpus=os.cpu_count(),
                     _system_config={"enable_metrics_collection": False}, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to Ray at {address or 'a new local instance'}: {exc}") from None
    return address


def on_this_node() -> dict[str, Any]:
    """Actor options that keep an actor of the driver's (the progress queue) on the driver's node, with no
    CPU: a node lost under the job takes its workers, never the driver's plumbing."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an address nothing listens at (``ray.init`` would retry for minutes)."""
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise ConfigError(f"Ray address '{address}': expected HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach Ray at {address}: {exc.strerror or exc}") from None


def check_resources(config: PlaitConfig) -> None:
    """Refuse, within seconds, what the cluster cannot place (instead of waiting forever)."""
    import ray

    scaling = config.scaling
    resources = ray.cluster_resources()
    per_worker = dict(scaling.resources_per_worker or {})
    per_worker.setdefault("CPU", 1.0)
    if scaling.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    workers = scaling.min_workers  # an elastic run starts with its minimum and grows as nodes join
    data_cpus = config.data.cpus if config.data.engine == "ray" else 0.0
    for name, amount in per_worker.items():
        needed, available = amount * workers, float(resources.get(name, 0))
        extra = data_cpus if name == "CPU" else 0.0
        if needed + extra > available:
            hint = " (no GPU in the cluster: set scaling.use_gpu=false)" if name == "GPU" and not available else ""
            decoding = f" + data.cpus {extra:g} for Ray Data's decoding workers" if extra else ""
            raise ConfigError(
                f"{config.source}: scaling: {workers} workers x {amount:g} {name} = {needed:g} {name}{decoding}, "
                f"but the Ray cluster has {available:g}{hint}"
            )


def check_mesh(config: PlaitConfig, raw: dict[str, Any]) -> None:
    """Refuse, before any worker starts, a mesh the workers or the model cannot take: the sizes against
    ``scaling.num_workers``, and (building the model on the meta device) tensor parallelism with no module
    that has a plan, heads it does not divide, and experts that expert parallelism does not divide."""
    if config.scaling.max_workers < 2:
        return
    shape = mesh_shape(config.scaling, config.source, config.run.checkpoint_format)
    if shape.tensor == 1 and shape.expert == 1:
        return
    from plait.core.parallel import expert_modules, tensor_parallel_plans
    from plait.core.runs import prepare as prepare_run
    from plait.launch.plan import meta_step

    checked, plugins = prepare_run(raw, config.source)
    state, _ = meta_step(checked, plugins)  # builds the model: plugins check what they split as they build it
    if shape.tensor > 1:
        tensor_parallel_plans(state.model, shape.tensor)
    if shape.expert > 1:
        expert_modules(state.model, shape.expert)


def check_storage(config: PlaitConfig) -> str:
    """The runs folder or storage URI, once it is known to be writable."""
    if is_uri(config.run.runs_dir):
        RemoteRuns(config.run.runs_dir, config.source).check_writable()
        return config.run.runs_dir
    runs = Path(config.run.runs_dir).resolve()
    try:
        runs.mkdir(parents=True, exist_ok=True)
        probe = runs / f".plait-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{config.source}: run.runs_dir: cannot write to {runs}: {exc.strerror}") from None
    return str(runs)


def check_storage_on_nodes(config: PlaitConfig) -> None:
    """Refuse a storage URI that a node of the cluster cannot write to, naming the node: the driver reaching
    it says nothing of the nodes (their credentials, network and mounts are their own)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    uri, source = config.run.runs_dir, config.source

    def probe() -> str | None:
        try:
            RemoteRuns(uri, source).check_writable()
        except ConfigError as exc:
            return str(exc).split(": run.runs_dir: ", 1)[-1]
        return None

    remote_probe = ray.remote(num_cpus=0, max_retries=0)(probe)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    answers = ray.get([remote_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote() for node in nodes], timeout=120)
    for node, problem in zip(nodes, answers, strict=True):
        if problem is not None:
            raise ConfigError(f"{source}: run.runs_dir: node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) "
                              f"{problem}; every node must reach the runs folder")


def _worker_error(exc: Exception, workers: dict[int, dict[str, Any]], checkpoints: Path | None) -> PlaitError | None:
    """A one-line error naming the rank (and the plugin and hook noted on the exception); for a
    failure that is not the user's input, also where that worker's log is and how to resume."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        return None
    from ray.exceptions import RayActorError

    def death(error: BaseException) -> BaseException | None:
        """What ended a worker's process (Train V2 reports it as a failed health check)."""
        cause = getattr(error, "health_check_failure", error)
        return cause if isinstance(cause, RayActorError) else None

    # A worker whose process died is the cause; its peers then fail in their next collective.
    died = [rank for rank, error in failures.items() if death(error) is not None]
    rank = min(died or failures)
    error = failures[rank]
    if isinstance(error, PlaitError):
        return type(error)(str(error))
    cause = death(error)
    if cause is not None:
        what = f"died ({type(cause).__name__}: {_first_line(cause)})"
    else:
        notes = "; ".join(getattr(error, "__notes__", []))
        what = f"failed{' ' + notes if notes else ''}: {type(error).__name__}: {_first_line(error)}"
    worker = workers.get(rank, {})
    log = f"; its log: {worker['node']}:{worker['log']}" if worker.get("log") else ""
    return PlaitError(f"worker rank {rank} {what}{log}; {_how_to_resume(checkpoints)}")


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


class HeadWatch(threading.Thread):
    """Watches the Ray head (its GCS port) while the driver waits for the workers. A head that stops
    answering ends the driver at once with one line that names the head and where the run resumes from:
    otherwise Ray's own client retries for a minute, then aborts the process with a native log. The
    workers lose the head too, so the job is over either way; the checkpoints in the runs folder are
    what is kept."""

    def __init__(self, gcs_address: str, resume_hint: Callable[[], str], name: str | None = None,
                 period_s: float = 2.0, misses: int = 3) -> None:
        super().__init__(name="plait-head-watch", daemon=True)
        self.gcs_address, self.resume_hint, self.period_s, self.misses = gcs_address, resume_hint, period_s, misses
        self.head = name or gcs_address  # as the user gave it
        self.done = threading.Event()

    def run(self) -> None:
        host, _, port = self.gcs_address.rpartition(":")
        missed = 0
        while not self.done.wait(self.period_s):
            try:
                socket.create_connection((host, int(port)), timeout=self.period_s).close()
                missed = 0
            except OSError:
                missed += 1
            if missed >= self.misses:
                print(f"plait: error: the Ray head at {self.head} stopped answering during the run "
                      f"(the head node died or cannot be reached); {self.resume_hint()}", file=sys.stderr,
                      flush=True)
                os._exit(1)


def _resume_hint(runs: str, name: str, source: str) -> str:
    if not is_uri(runs):
        return _how_to_resume(Path(runs) / name / "checkpoints")
    try:
        newest = RemoteRuns(runs, source).complete_checkpoints(name)[-1:]
    except Exception:  # noqa: BLE001 - storage that cannot be read now: say where the checkpoints are
        newest = []
    where = f"the newest checkpoint in {runs}, {newest[0]}, is kept" if newest else "no checkpoint reached storage"
    return f"{where}: once the cluster is back, the same command resumes the run"


def _how_to_resume(checkpoints: Path | None) -> str:
    newest = checkpoint.latest(checkpoints) if checkpoints is not None else None
    if newest is not None:
        return f"the newest checkpoint, {newest.name}, is kept: the same command resumes from it"
    if checkpoints is None:  # a storage URI: the checkpoints are there
        return "the same command resumes from the newest checkpoint in run.runs_dir"
    return "no checkpoint was written yet: the same command starts the run again"


def ray_scaling(scaling: ScalingSettings) -> dict[str, Any]:
    """Ray Train's ``ScalingConfig`` (Train V2's: an elastic range is its ``(min_workers, max_workers)``)."""
    options: dict[str, Any] = {"num_workers": scaling.num_workers, "use_gpu": scaling.use_gpu,
                               "resources_per_worker": scaling.resources_per_worker,
                               "placement_strategy": scaling.placement_strategy}
    if scaling.elastic:
        options["elastic_resize_monitor_interval_s"] = scaling.elastic_resize_interval_s
    return options


def train(config: PlaitConfig, raw: dict[str, Any], address: str | None = None,
          verbose: bool = False) -> dict[str, Any]:
    """Train under Ray Train; return the run's results (what ``metrics.json`` holds)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    if not verbose:  # Ray's own INFO and notice lines (local mode runs Ray Train in this process)
        logging.getLogger("ray").setLevel(logging.ERROR)
    runs = check_storage(config)
    check_mesh(config, raw)
    check_elastic(config)
    queue, given = None, None
    if scaling.max_workers > 0:
        from ray.util.queue import Queue

        started = time.perf_counter()
        given = connect(address, verbose)
        check_resources(config)
        if is_uri(runs):
            check_storage_on_nodes(config)
        logging.getLogger("plait").info("Ray ready in %.1f s", time.perf_counter() - started)
        queue = Queue(maxsize=10_000, actor_options=on_this_node())
    cpus_per_worker = (scaling.resources_per_worker or {}).get("CPU", 1)
    data: dict[str, Any] = {}
    if config.data.engine == "ray":
        if scaling.max_workers == 0:
            raise ConfigError(f"{config.source}: data.engine: ray feeds Ray Train workers; set scaling.num_workers "
                              "to 1 or more, or use data.engine: torch in-process")
        from plait.launch.ray_data import datasets_for

        datasets, data_config = datasets_for(config, raw, runs, scaling.max_workers, scaling.tensor_parallel)
        data = {"datasets": datasets, "dataset_config": data_config}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"raw": raw, "source": config.source, "cwd": os.getcwd(), "progress": queue,
                           "threads": max(1, int(cpus_per_worker)) if scaling.max_workers else torch.get_num_threads()},
        scaling_config=ScalingConfig(**ray_scaling(scaling)),
        # No CheckpointConfig: Ray is handed no checkpoint, and run.keep_checkpoints already
        # bounds plait's own (see the module docstring).
        run_config=RunConfig(
            name=config.run.name, storage_path=runs,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
        **data,
    )
    outcome: dict[str, Any] = {}
    workers: dict[int, dict[str, Any]] = {}  # rank -> node and log file, as each worker reports them

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    if queue is None:
        run()
    else:
        import ray

        gcs = ray.get_runtime_context().gcs_address
        watch = HeadWatch(gcs, lambda: _resume_hint(runs, config.run.name, config.source),
                          name=given if given and given not in ("auto", "local") else gcs)
        watch.start()
        running = threading.Thread(target=run, name="plait-ray-fit", daemon=True)
        running.start()
        show_progress(queue, running, workers)
        running.join()
        watch.done.set()
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, PlaitError):
            raise exc
        error = _worker_error(exc, workers, None if is_uri(runs) else Path(runs) / config.run.name / "checkpoints")
        if error is None:
            raise exc
        raise error from exc
    result = outcome["result"]
    metrics = (result.metrics or {}).get("run")
    if metrics is None:  # local mode returns what the train function reported too; read the folder else
        import json

        runs_dir = staging_dir(runs, 0) if is_uri(runs) else Path(runs)
        metrics = json.loads((runs_dir / config.run.name / "metrics.json").read_text())
    if workers:  # where the workers that finished ran (a restart can place them anew)
        metrics["workers"] = [{key: workers[rank].get(key) for key in ("node", "node_id")}
                              for rank in range(metrics["world_size"]) if rank in workers]
    return metrics
