"""What a run asks of the cluster: training workers, GPU use, micro-batches and the Data actor pool.

A run's ``auto`` cluster fields (``train.use_gpu``, ``train.num_workers``, ``data.actors``,
``optim.micro_batch_size``; ``ibot_ray.config.CLUSTER_AUTO_FIELDS``) are sized from a :class:`ClusterShape`, the
node types the cluster has *or can launch*, before any resource is requested:

* **Where the shape comes from** (:func:`describe_cluster`): the cluster config the autoscaler reported to the GCS
  (``ray._private.state.state.get_cluster_config()``: autoscaler v2, KubeRay), else the autoscaling config ``ray up``
  writes on the head (``~/ray_bootstrap_config.yaml``, what ``ray start --autoscaling-config`` reads; the job
  entrypoint runs on the head), else the nodes alive now (``ray.nodes()``: a static cluster, a laptop). A cluster
  whose GPU nodes scale from zero therefore still plans GPU training: the alive nodes alone would show none.
* **Training** (:func:`plan_run`): GPU when a worker node type has (or can launch) ``train.gpus_per_worker`` GPUs;
  workers = every GPU the cluster can have, elastic down to a quarter of that (spot nodes come and go); CPU
  training runs one worker. The head never trains when the cluster has worker node types.
* **Micro-batches** (item 5 of issue 12): a rank holds ``ceil(batch / world)`` images; at the elastic *minimum*
  world size that is the most it will ever hold. ``micro_batch_size: auto`` splits it into equal chunks of at most
  ``train.images_per_device`` (estimated from the model, the crops and the GPU memory when 0), so every world size
  between min and max fits the device.
* **Data actors**: the CPU-only node types' CPUs (``DATA_CPU`` custom resource when the cluster file sets one, so the
  actors stay off the head and off the GPU nodes), at least ``ACTORS_PER_GPU_WORKER`` per training worker at the
  elastic minimum; on a single machine, the CPUs the training workers leave.

The functions that decide are pure (a shape in, a plan out): tests feed them real Ray resource dicts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ibot_ray.config import AUTO, CLUSTER_AUTO_FIELDS, IBOTConfig, get_field, set_field
from ibot_ray.recipe import Derived

#: The custom resource of the CPU node type in cluster.yaml / cluster.gcp.yaml (one unit per CPU): Data's crop
#: actors ask for it, so they run on those nodes only, never on the head or a GPU node's CPUs.
DATA_RESOURCE = "DATA_CPU"
#: The resource Ray gives the head node.
HEAD_RESOURCE = "node:__internal_head__"
#: Where ``ray up`` leaves the autoscaling config on the head (``ray start --autoscaling-config=...``).
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
#: Crop actors per training worker at least (one core crops ~200 photos/s; docs/deploying.md "Cost": ~5 cores per A10G).
ACTORS_PER_GPU_WORKER = 4
#: The elastic minimum is this fraction of the GPUs the cluster can have (8 GPUs: 2..8 workers).
ELASTIC_MIN_FRACTION = 0.25
#: GPU memory (GiB) by Ray's ``accelerator_type:<name>`` resource; unknown accelerators count as the smallest.
GPU_MEMORY_GB = {"T4": 16, "V100": 16, "A10G": 24, "L4": 24, "A10": 24, "L40S": 48, "A100": 40, "A100-80G": 80,
                 "H100": 80, "H200": 141}
DEFAULT_GPU_MEMORY_GB = 16
#: Part of the GPU memory a forward/backward pass may plan for (allocator fragmentation, CUDA context, Data prefetch).
USABLE_MEMORY_FRACTION = 0.5
#: ViT widths, depths and heads by timm name (the model is not built to plan).
_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
              "huge": (1280, 32, 16)}


# ---- cluster shapes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    """One kind of node: its Ray resources, how many the cluster can have (``max_count``) and has now."""

    name: str
    resources: dict
    max_count: int
    alive: int = 0
    head: bool = False

    def res(self, key: str) -> float:
        return float(self.resources.get(key, 0) or 0)

    @property
    def gpu_memory_gb(self) -> float:
        for key in self.resources:
            if key.startswith("accelerator_type:"):
                return float(GPU_MEMORY_GB.get(key.split(":", 1)[1], DEFAULT_GPU_MEMORY_GB))
        return float(DEFAULT_GPU_MEMORY_GB)

    def __str__(self) -> str:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(self.resources.items()) if k in ("CPU", "GPU", DATA_RESOURCE))
        return f"{self.name}{' (head)' if self.head else ''} x{self.max_count} [{res}]"


@dataclass
class ClusterShape:
    node_types: list[NodeType]
    source: str

    @property
    def compute_types(self) -> list[NodeType]:
        """The node types that run workers and actors: every type but the head, unless the head is all there is."""
        workers = [n for n in self.node_types if not n.head and n.max_count != 0]
        return workers or list(self.node_types)

    def capacity(self, key: str, types: Optional[Iterable[NodeType]] = None) -> float:
        return sum(n.max_count * n.res(key) for n in (self.compute_types if types is None else types))

    def __str__(self) -> str:
        return f"{self.source}: " + "; ".join(str(n) for n in self.node_types)


def _plain_resources(res: dict) -> dict:
    return {k: float(v) for k, v in res.items()
            if not k.startswith("node:") and k not in ("memory", "object_store_memory") and float(v) > 0}


def shape_from_nodes(nodes: list[dict], source: str = "the alive nodes (ray.nodes())") -> ClusterShape:
    """Alive nodes grouped by their resources (``ray.nodes()`` entries); each group's size is its maximum."""
    groups: dict[tuple, list] = {}
    for n in nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {})
        key = (HEAD_RESOURCE in res, tuple(sorted(_plain_resources(res).items())))
        groups.setdefault(key, []).append(res)
    types = []
    for i, ((is_head, items), members) in enumerate(sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))):
        types.append(NodeType(name="head" if is_head else f"nodes{i}", resources=dict(items),
                              max_count=len(members), alive=len(members), head=is_head))
    return ClusterShape(types, source)


def shape_from_autoscaler_config(config: dict, source: str = "the autoscaling config") -> ClusterShape:
    """The node types of a cluster launcher config (``cluster.yaml`` after ``prepare_config``, or the head's
    ``~/ray_bootstrap_config.yaml``): each type can grow to ``max_workers`` nodes, capped by the cluster's
    ``max_workers``."""
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    types = []
    for name, t in (config.get("available_node_types") or {}).items():
        is_head = name == head
        n = 1 if is_head else int(t.get("max_workers", cap if cap is not None else 0))
        if cap is not None and not is_head:
            n = min(n, int(cap))
        types.append(NodeType(name=name, resources=_plain_resources(t.get("resources") or {}), max_count=n,
                              head=is_head))
    return ClusterShape(types, source)


def shape_from_cluster_config(config: Any, nodes: list[dict]) -> ClusterShape:
    """The node groups an autoscaler reported to the GCS (``autoscaler_pb2.ClusterConfig``), plus the head from the
    alive nodes. An unbounded group (max -1) counts with the nodes it has now (at least one)."""
    alive = shape_from_nodes(nodes)
    types = [t for t in alive.node_types if t.head]
    for g in config.node_group_configs:
        res = _plain_resources(dict(g.resources))
        now = sum(t.alive for t in alive.node_types if not t.head and t.resources == res)
        types.append(NodeType(name=g.name, resources=res, max_count=g.max_count if g.max_count >= 0 else max(1, now),
                              alive=now))
    return ClusterShape(types, "the autoscaler's cluster config (GCS)")


def describe_cluster() -> ClusterShape:
    """The connected cluster's shape: the GCS cluster config, else the head's autoscaling config, else the alive
    nodes (see the module doc)."""
    import ray

    nodes = ray.nodes()
    try:
        from ray._private.state import state

        reported = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - older GCS, or no autoscaler: fall through
        reported = None
    if reported is not None and reported.node_group_configs:
        return shape_from_cluster_config(reported, nodes)
    path = Path(os.path.expanduser(os.environ.get("IBOT_RAY_AUTOSCALER_CONFIG", AUTOSCALER_CONFIG)))
    if path.is_file():
        import yaml

        try:
            return shape_from_autoscaler_config(yaml.safe_load(path.read_text()) or {}, source=str(path))
        except (OSError, ValueError, TypeError, yaml.YAMLError):
            pass
    return shape_from_nodes(nodes)


def local_shape() -> ClusterShape:
    """This machine as a one-node cluster (before a local Ray starts)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        pass
    res = {"CPU": float(os.cpu_count() or 1), **({"GPU": float(gpus)} if gpus else {})}
    return ClusterShape([NodeType("this machine", res, max_count=1, alive=1, head=True)], "this machine")


# ---- the device budget -------------------------------------------------------------------------------------------


def _vit_size(cfg: IBOTConfig) -> tuple[int, int, int]:
    m = cfg.model
    key = next((k for k in _VIT_SIZES if re.search(rf"_{k}_", f"_{m.arch}_")), "base")
    width, depth, heads = _VIT_SIZES[key]
    return int(m.embed_dim or width), int(m.depth or depth), int(m.num_heads or heads)


def bytes_per_image(cfg: IBOTConfig) -> float:
    """Training memory one image costs in a forward/backward pass (bf16 activations of every crop through the
    student, its heads and the loss), by the transformer activation count of Korthikanti et al. 2022
    (``tokens * (34 * width + 5 * heads * tokens)`` bytes per layer)."""
    width, depth, heads = _vit_size(cfg)
    c, h, p = cfg.crops, cfg.head, cfg.patch_size
    crops = [(c.global_crops_size // p) ** 2 + 1] * c.global_crops_number
    crops += [(c.local_crops_size // p) ** 2 + 1] * c.local_crops_number
    backbone = depth * sum(s * (34 * width + 5 * heads * s) for s in crops)
    patch_tokens = c.global_crops_number * (c.global_crops_size // p) ** 2
    head = 2 * patch_tokens * (width + 3 * h.hidden_dim + h.bottleneck_dim + h.patch_out_dim)  # student MLP, bf16
    loss = 4 * 4 * patch_tokens * h.patch_out_dim  # fp32 softmaxes of student and teacher, log-probs, product
    return float(backbone + head + loss)


def _param_count(cfg: IBOTConfig) -> float:
    width, depth, _ = _vit_size(cfg)
    h = cfg.head
    head = width * h.hidden_dim + h.hidden_dim ** 2 * max(0, h.nlayers - 2) + h.hidden_dim * h.bottleneck_dim
    head += h.bottleneck_dim * (h.out_dim + (0 if h.shared_head else h.patch_out_dim))
    return 12.0 * depth * width ** 2 + head


def estimate_images_per_device(cfg: IBOTConfig, gpu_memory_gb: float) -> int:
    """Images one forward pass may hold on a GPU of ``gpu_memory_gb``: the usable memory, less the weights, the
    gradients, AdamW's moments and the teacher (20 bytes a parameter), over :func:`bytes_per_image`. An estimate
    (not measured on a GPU in this project): measure and set ``train.images_per_device`` for a new GPU."""
    usable = gpu_memory_gb * 2**30 * USABLE_MEMORY_FRACTION - 20.0 * _param_count(cfg)
    return max(1, int(usable // bytes_per_image(cfg)))


# ---- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    use_gpu: bool
    num_workers: tuple[int, int]
    actors: tuple[int, int]
    actor_resource: Optional[str]
    micro_batch_size: int
    images_per_device: int  # the budget (0: none)
    cluster: str
    derived: list[Derived] = field(default_factory=list)  # the fields that were auto, with the reason
    warnings: list[str] = field(default_factory=list)  # user values the cluster cannot honour as they are

    def lines(self) -> list[str]:
        return [str(d) for d in self.derived] + [f"warning: {w}" for w in self.warnings]


def micro_batch_for(global_batch: int, min_world: int, budget: int) -> tuple[int, int]:
    """(micro-batch size, images per rank at the elastic minimum): 0 (one pass) when the minimum's share fits the
    budget (or there is none), else the size of equal chunks of at most ``budget`` images."""
    share = math.ceil(global_batch / max(1, min_world))
    if budget <= 0 or share <= budget:
        return 0, share
    chunks = math.ceil(share / budget)
    return math.ceil(share / chunks), share


def plan_run(cfg: IBOTConfig, shape: ClusterShape, *, per_trial: bool = False) -> RunPlan:
    """Size a run's ``auto`` cluster fields to ``shape`` (pure; ``cfg`` is not changed). ``per_trial``: a sweep's
    trial, whose ``auto`` workers are one (trials share the cluster; :func:`max_concurrent_trials`)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    derived: list[Derived] = []
    warnings: list[str] = []
    types = shape.compute_types
    gpu_types = [n for n in types if t.gpus_per_worker > 0 and n.res("GPU") >= t.gpus_per_worker and n.max_count]
    gpus = sum(n.max_count * int(n.res("GPU") // t.gpus_per_worker) for n in gpu_types)

    if t.use_gpu == AUTO:
        use_gpu = bool(gpu_types)
        why = (f"{gpus} GPU worker slot(s) the cluster has or can launch ({', '.join(str(n) for n in gpu_types)})"
               if use_gpu else f"no node type has {t.gpus_per_worker:g} GPU(s) ({shape})")
        derived.append(Derived("train.use_gpu", "true" if use_gpu else "false", why))
    else:
        use_gpu = t.use_gpu == "true"
        if use_gpu and not gpu_types:
            warnings.append(f"train.use_gpu=true, but no node type has {t.gpus_per_worker:g} GPU(s): the workers "
                            f"will wait for GPUs that never come ({shape})")

    if t.num_workers == AUTO:
        if per_trial:
            workers, why = (1, 1), "one worker per sweep trial (the trials share the cluster)"
        elif use_gpu:
            hi = max(1, min(gpus, o.batch_size))
            lo = max(1, int(hi * ELASTIC_MIN_FRACTION))
            workers = (lo, hi)
            why = (f"one per GPU the cluster can have ({gpus}), elastic down to a quarter: spot nodes come and go"
                   + (f"; at most the global batch {o.batch_size}" if gpus > o.batch_size else ""))
        else:
            workers, why = (1, 1), "CPU training: one worker, using its node's cores"
        derived.append(Derived("train.num_workers", list(workers), why))
    else:
        workers = tuple(t.num_workers)
        if use_gpu and gpu_types and workers[0] > gpus:
            warnings.append(f"train.num_workers minimum {workers[0]} is more than the {gpus} GPU workers the "
                            "cluster can have: the run will never start")

    data_types = [n for n in types if n.res(DATA_RESOURCE) > 0]
    actor_resource = DATA_RESOURCE if data_types else None
    if not data_types:
        data_types = [n for n in types if n.res("GPU") == 0 and not n.head and n.res("CPU") >= d.cpus_per_actor]
    if actor_resource and d.actor_resource is None:
        derived.append(Derived("data.actor_resource", actor_resource,
                               f"the CPU node type(s) {', '.join(n.name for n in data_types)} carry it: crop actors "
                               "stay off the head and off the GPU nodes"))
    elif d.actor_resource is not None:
        actor_resource = d.actor_resource
    if d.actors == AUTO:
        if data_types:
            cpus = sum(n.max_count * (n.res(actor_resource) if actor_resource else n.res("CPU")) for n in data_types)
            where = f"the CPU node type(s) {', '.join(str(n) for n in data_types)}"
        else:  # a single machine or a GPU-only cluster: the CPUs the training workers leave, less one for reads
            used = workers[1] * t.cpus_per_worker
            cpus = shape.capacity("CPU") - used - 1
            where = f"{shape.capacity('CPU'):g} CPUs less {used:g} for the training workers and 1 for Data's reads"
        hi = max(1, int(cpus // d.cpus_per_actor))
        lo = min(hi, max(1, workers[0] * ACTORS_PER_GPU_WORKER)) if use_gpu else 1
        actors = (lo, hi)
        derived.append(Derived("data.actors", list(actors),
                               f"{where}, {d.cpus_per_actor:g} CPU(s) per actor"
                               + (f"; at least {ACTORS_PER_GPU_WORKER} per worker at the elastic minimum"
                                  if use_gpu else "")))
    else:
        actors = tuple(d.actors)

    budget = t.images_per_device
    budget_why = "train.images_per_device"
    if budget == 0 and use_gpu and gpu_types:
        mem = min(n.gpu_memory_gb for n in gpu_types) * t.gpus_per_worker
        budget = estimate_images_per_device(cfg, mem)
        budget_why = (f"estimated for {mem:g} GiB of GPU memory ({bytes_per_image(cfg) / 2**20:.0f} MiB an image; "
                      "set train.images_per_device to override)")
    micro, share = micro_batch_for(o.batch_size, workers[0], budget)
    if o.micro_batch_size == AUTO:
        if micro == 0:
            why = (f"one pass: at most {share} images per rank at the elastic minimum of {workers[0]} worker(s)"
                   + (f", within {budget} per device ({budget_why})" if budget else ""))
        else:
            why = (f"{share} images per rank at the elastic minimum of {workers[0]} worker(s) > {budget} per device "
                   f"({budget_why}): {math.ceil(share / micro)} accumulated micro-batches")
        derived.append(Derived("optim.micro_batch_size", micro, why))
    else:
        micro = int(o.micro_batch_size)
        biggest = micro or share
        if budget and biggest > budget:
            warnings.append(f"optim.micro_batch_size={o.micro_batch_size} puts {biggest} images on a device at the "
                            f"elastic minimum of {workers[0]} worker(s), over the {budget} of {budget_why}: "
                            "set optim.micro_batch_size=auto")
    return RunPlan(use_gpu=use_gpu, num_workers=(int(workers[0]), int(workers[1])),
                   actors=(int(actors[0]), int(actors[1])), actor_resource=actor_resource, micro_batch_size=micro,
                   images_per_device=budget, cluster=str(shape), derived=derived, warnings=warnings)


def apply_plan(cfg: IBOTConfig, plan: RunPlan) -> IBOTConfig:
    """Write the plan's values into the ``auto`` fields of ``cfg`` (in place; user values stay)."""
    set_field(cfg, "train.use_gpu", "true" if plan.use_gpu else "false")
    values = {"train.num_workers": plan.num_workers, "data.actors": plan.actors,
              "optim.micro_batch_size": plan.micro_batch_size}
    for name in CLUSTER_AUTO_FIELDS:
        if get_field(cfg, name) == AUTO:
            set_field(cfg, name, values[name])
    if cfg.data.actor_resource is None:
        cfg.data.actor_resource = plan.actor_resource
    return cfg


def needs_plan(cfg: IBOTConfig) -> bool:
    return cfg.train.use_gpu == AUTO or any(get_field(cfg, f) == AUTO for f in CLUSTER_AUTO_FIELDS)


def max_concurrent_trials(cfg: IBOTConfig, shape: ClusterShape, plan: RunPlan, cpus_per_trial: float) -> int:
    """Trials that fit the cluster at its maximum size: GPU worker slots // a trial's workers on GPU clusters, else
    CPUs // the CPUs one trial reserves. At least 1."""
    if plan.use_gpu:
        gpu_types = [n for n in shape.compute_types if n.res("GPU") >= cfg.train.gpus_per_worker > 0]
        slots = sum(n.max_count * int(n.res("GPU") // cfg.train.gpus_per_worker) for n in gpu_types)
        return max(1, slots // plan.num_workers[1])
    return max(1, int(shape.capacity("CPU") // cpus_per_trial))


__all__ = ["ACTORS_PER_GPU_WORKER", "AUTOSCALER_CONFIG", "ClusterShape", "DATA_RESOURCE", "NodeType", "RunPlan",
           "apply_plan", "bytes_per_image", "describe_cluster", "estimate_images_per_device", "local_shape",
           "max_concurrent_trials", "micro_batch_for", "needs_plan", "plan_run", "shape_from_autoscaler_config",
           "shape_from_cluster_config", "shape_from_nodes"]
