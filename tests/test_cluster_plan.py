"""What a run asks of the cluster (pipelines/cluster_plan.py): the planner on real cluster descriptions, and one
real run on the local Ray whose printed plan is what it used.

* The shipped ``cluster.yaml`` after Ray's own ``prepare_config`` (what the head's ``~/ray_bootstrap_config.yaml``
  holds), with every GPU node group at 0 nodes: the ``vit_small_16`` preset trains on GPU, one worker per GPU the
  cluster can launch (elastic 2..8), crop actors pinned to the CPU node type, micro-batches that fit a GPU at the
  elastic minimum (issue 12 items 2 and 5).
* Alive nodes in ``ray.nodes()`` form (the shared local Ray's own entry, plus GPU nodes made from it).
* A real ``pretrain`` on the local Ray with ``auto`` fields and a 4-image device budget: the printed plan matches
  the planner, and the worker trained in micro-batches of 4 at the minimum world size.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ibot_ray.config import load_config
from ibot_ray.step import IBOTStep
from pipelines.cluster_plan import (
    DATA_RESOURCE,
    ClusterShape,
    NodeType,
    apply_plan,
    estimate_images_per_device,
    micro_batch_for,
    plan_run,
    shape_from_autoscaler_config,
    shape_from_nodes,
)

REPO = Path(__file__).resolve().parents[1]


def _prepared(name: str) -> dict:
    cfg = prepare_config(yaml.safe_load((REPO / name).read_text()))
    validate_config(cfg)
    return cfg


def _chunk_sizes(cfg, batch: int) -> list[int]:
    """The micro-batches the training step (ibot_ray/step.py) cuts a rank's batch into."""
    return [s.stop - s.start for s in IBOTStep._micro_batches(SimpleNamespace(cfg=cfg), batch)]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.gcp.yaml"])
def test_gpu_preset_on_a_cluster_that_scales_from_zero(name):
    raw = _prepared(name)
    assert all(t.get("min_workers", 0) == 0 for k, t in raw["available_node_types"].items()
               if k != raw["head_node_type"])  # nothing runs yet: the alive nodes would show no GPU at all
    shape = shape_from_autoscaler_config(raw)
    cfg = load_config("vit_small_16")
    plan = plan_run(cfg, shape)
    assert plan.use_gpu and plan.num_workers == (2, 8)
    assert plan.actor_resource == DATA_RESOURCE
    data_cpus = sum(t["max_workers"] * t["resources"].get(DATA_RESOURCE, 0)
                    for t in raw["available_node_types"].values())
    assert plan.actors == (8, data_cpus)  # 4 per worker at the minimum, every CPU of the CPU nodes at most
    assert {d.field for d in plan.derived} == {"train.use_gpu", "train.num_workers", "data.actors",
                                               "data.actor_resource", "optim.micro_batch_size"}
    # 24 GB GPUs, batch 1024: 512 images per rank at 2 workers do not fit; every world size 2..8 does
    budget = plan.images_per_device
    assert budget == estimate_images_per_device(cfg, 24) and 8 <= budget < 512
    apply_plan(cfg, plan)
    cfg.validate()
    assert cfg.train.num_workers == (2, 8) and cfg.optim.micro_batch_size == plan.micro_batch_size > 0
    for world in range(2, 9):
        share = math.ceil(1024 / world)
        sizes = _chunk_sizes(cfg, share)
        assert sum(sizes) == share and max(sizes) <= budget, (world, sizes)
    # the old one-pass default would have put all 512 on one GPU at the elastic minimum
    assert max(_chunk_sizes(load_config("vit_small_16", ["optim.micro_batch_size=0"]), 512)) == 512
    # a user value is kept, with a warning that it does not fit
    pinned = plan_run(load_config("vit_small_16", ["optim.micro_batch_size=0"]), shape)
    assert pinned.micro_batch_size == 0 and any("optim.micro_batch_size=0" in w for w in pinned.warnings)


def test_placement_off_the_head_and_the_gpu_nodes():
    raw = _prepared("cluster.yaml")
    gpu = next(k for k, t in raw["available_node_types"].items() if t["resources"].get("GPU"))
    # without the DATA_CPU pin, actors go by CPU-only worker types (never the head, never a GPU type)
    unpinned = copy.deepcopy(raw)
    for t in unpinned["available_node_types"].values():
        t["resources"].pop(DATA_RESOURCE, None)
    plan = plan_run(load_config("vit_small_16"), shape_from_autoscaler_config(unpinned))
    assert plan.actor_resource is None and plan.actors[1] == 4 * 32
    # a cluster without GPU node types trains on CPU, one worker
    cpu_only = copy.deepcopy(raw)
    del cpu_only["available_node_types"][gpu]
    plan = plan_run(load_config("vit_small_16"), shape_from_autoscaler_config(cpu_only))
    assert not plan.use_gpu and plan.num_workers == (1, 1) and plan.micro_batch_size == 0
    # an explicit use_gpu=true on such a cluster is kept, and the plan says why it will wait
    plan = plan_run(load_config("vit_small_16", ["train.use_gpu=true"]), shape_from_autoscaler_config(cpu_only))
    assert plan.use_gpu and plan.warnings


def test_alive_nodes_as_ray_reports_them(ray_cluster):
    """``ray.nodes()`` entries: the local Ray alone (head only: it trains and crops), then the same entry as a
    head beside two 4-GPU nodes."""
    import ray

    nodes = ray.nodes()
    shape = shape_from_nodes(nodes)
    assert [t.head for t in shape.node_types] == [True] and shape.node_types[0].res("CPU") == 4
    plan = plan_run(load_config("demo", ["train.num_workers=auto", "data.actors=auto"]), shape)
    assert not plan.use_gpu and plan.num_workers == (1, 1) and plan.actors == (1, 2)  # 4 CPUs - 1 worker - 1 read

    head = nodes[0]
    gpu_nodes = []
    for i in range(2):
        n = copy.deepcopy(head)
        n["NodeID"] = f"{i:02d}" * 28
        n["Resources"] = {k: v for k, v in n["Resources"].items() if k != "node:__internal_head__"}
        n["Resources"].update({"CPU": 32.0, "GPU": 4.0, "accelerator_type:H100": 1.0})
        gpu_nodes.append(n)
    shape = shape_from_nodes([head, *gpu_nodes])
    cfg = load_config("vit_small_16")
    plan = plan_run(cfg, shape)
    assert plan.use_gpu and plan.num_workers == (2, 8)
    assert plan.images_per_device == estimate_images_per_device(cfg, 80) > estimate_images_per_device(cfg, 24)
    # GPU-only cluster: the actors get the CPUs the GPU workers leave on their nodes, less one for reads
    assert plan.actor_resource is None and plan.actors == (8, int(2 * 32 - 8 - 1))


def test_micro_batches_fit_every_world_size_between_min_and_max():
    for g in (16, 100, 1000, 1024, 4096):
        for lo in (1, 2, 3, 7):
            for budget in (0, 1, 5, 48, 64, 5000):
                micro, share = micro_batch_for(g, lo, budget)
                assert share == math.ceil(g / lo)
                if budget == 0 or share <= budget:
                    assert micro == 0
                    continue
                assert 0 < micro <= budget
                assert math.ceil(share / micro) == math.ceil(share / budget)  # as few passes as the budget allows
    one = ClusterShape([NodeType("box", {"CPU": 8.0, "GPU": 1.0}, 1, head=True)], "one box")
    plan = plan_run(load_config("vit_small_16", ["train.images_per_device=100"]), one)
    assert plan.num_workers == (1, 1) and plan.images_per_device == 100
    assert plan.micro_batch_size == math.ceil(1024 / math.ceil(1024 / 100))


def test_printed_plan_is_what_the_run_used(ray_cluster, tmp_path, capsys, monkeypatch, image_writer):
    """A real run on the local Ray with cluster ``auto`` fields: the derived lines it printed before training are
    the planner's, and the worker trained in micro-batches within the 4-image budget at the minimum world size. The
    Train controller's start timeout comes from the config (also in a sweep trial's process)."""
    from test_pretrain import TINY

    from pipelines.cluster_plan import describe_cluster
    from pipelines.metrics import read_metrics
    from pipelines.pretrain import pretrain

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")  # restored after the test
    data = tmp_path / "images"
    image_writer(data, 32, kinds=("jpeg", "png"), size=(40, 40))
    sets = [s for s in TINY if not s.startswith(("train.num_workers", "data.actors"))]
    sets += [f"data.source={data}", "optim.epochs=1", "train.num_workers=auto", "data.actors=auto",
             "optim.micro_batch_size=auto", "train.images_per_device=4", "train.worker_start_timeout_s=25"]
    expected = plan_run(load_config("demo", sets), describe_cluster())
    assert expected.micro_batch_size == 4 and expected.num_workers == (1, 1)

    result = pretrain(load_config("demo", sets), storage=str(tmp_path / "runs"), name="plan", knn=False,
                      export=False)
    out = capsys.readouterr().out
    printed = [ln for ln in out.splitlines() if ln.startswith("[ibot-ray] derived ")]
    for d in expected.derived:
        assert f"[ibot-ray] derived {d} (set it to override)" in printed, (str(d), printed)
    assert result.steps == 2
    start = next(r for r in read_metrics(tmp_path / "runs" / "plan" / "logs" / "metrics.jsonl")
                 if r.get("event") == "start")
    assert start["world_size"] == 1 and start["micro_batch_size"] == 4
    import os

    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "25"


def test_one_storage_resolver_and_one_gpu_decision():
    """Runs and sweeps resolve storage with one function and one default; the GPU choice is made in one place."""
    import re

    import pipelines.pretrain as pretrain
    import tune.sweep as sweep

    assert sweep.resolve_storage is pretrain.resolve_storage and not hasattr(sweep, "DEFAULT_STORAGE")
    sources = {p: p.read_text() for d in ("pipelines", "tune") for p in (REPO / d).glob("*.py")}
    assert [p.name for p, s in sources.items() if re.search(r"^DEFAULT_STORAGE\s*=", s, re.M)] == ["pretrain.py"]
    deciders = [p.name for p, s in sources.items() if re.search(r"use_gpu\s*==\s*(\"auto\"|AUTO)", s)]
    assert deciders == ["cluster_plan.py"], deciders
    assert not [p.name for p, s in sources.items() if "cluster_resources()" in s]  # alive GPUs only: not the fleet
