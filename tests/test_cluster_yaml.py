"""Offline checks of the shipped cluster YAMLs (cluster.yaml for AWS, cluster.gcp.yaml for GCP).

1. Ray's own launcher validation, exactly what ``ray up`` runs before it touches the cloud:
   ``prepare_config`` (merge the provider's defaults.yaml) then ``validate_config`` (ray-schema.json + node-type
   checks). Broken variants must be rejected, so this check can fail.
2. What the training config needs from the cluster: GPU worker nodes with at least ``train.gpus_per_worker`` GPUs,
   a head that alone carries the driver resource (TRAIN_DRIVER), a CPU-only worker type for Ray Data with at least
   ``data.cpus_per_actor`` CPUs, spot/preemptible workers and an on-demand head, ray pinned to the installed version,
   the spot watcher started on workers with flags its parser accepts, the project synced and installed, and an
   explicit /dev/shm size for the object store. Each check is a function that the negative tests also run on
   broken copies.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ibot_ray.config import load_config
from pipelines.spot_watcher import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))
# The deployment guide; once merged into the README, the checks read it there.
_GUIDE = REPO / "docs" / "deployment.md"
DEPLOYMENT_DOC = _GUIDE if _GUIDE.exists() else REPO / "README.md"
DRIVER_RESOURCE = "TRAIN_DRIVER"  # the name docs/deployment.md passes to --entrypoint-resources
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(raw: dict) -> dict:
    """What `ray up` validates: the YAML merged with the provider defaults (a deep copy; ``raw`` is untouched)."""
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def head(cfg: dict) -> dict:
    return cfg["available_node_types"][cfg["head_node_type"]]


def is_spot(cfg: dict, node_type: dict) -> bool:
    """AWS: InstanceMarketOptions.MarketType spot. GCP: scheduling.provisioningModel SPOT or preemptible."""
    nc = node_type["node_config"]
    if cfg["provider"]["type"] == "aws":
        return str(nc.get("InstanceMarketOptions", {}).get("MarketType", "")).lower() == "spot"
    sched = nc.get("scheduling", {})
    entries = sched if isinstance(sched, list) else [sched]
    return any(str(e.get("provisioningModel", "")).upper() == "SPOT" or e.get("preemptible") is True
               for e in entries)


def shm_bytes(options: list[str]) -> int:
    """The --shm-size of a docker option list, in bytes (0 when absent)."""
    for opt in options:
        m = re.search(r"--shm-size[= ]'?(\d+(?:\.\d+)?)([bkmg]?)", opt.lower())
        if m:
            return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])
    return 0


# ---- the checks (each asserts; the negative tests feed them broken copies) --------------------------


def check_gpu_workers(cfg: dict, train_cfg) -> list[str]:
    gpu_types = [k for k, v in workers(cfg).items() if v["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no worker type has a GPU"
    for k in gpu_types:
        res = workers(cfg)[k]["resources"]
        assert res["GPU"] >= train_cfg.gpus_per_worker, f"{k}: {res['GPU']} GPU < train.gpus_per_worker"
        assert res.get("CPU", 0) >= train_cfg.cpus_per_worker * res["GPU"], f"{k}: too few CPUs for its workers"
        assert workers(cfg)[k]["max_workers"] >= 1, f"{k}: max_workers must allow at least one node"
    return gpu_types


def check_driver_resource(cfg: dict, name: str) -> None:
    res = head(cfg)["resources"]
    assert isinstance(res.get(name), int) and res[name] >= 1, f"head resources {res} lack {name}"
    assert res.get("GPU", 0) == 0, "the head must not offer GPUs to Train workers"
    for k, v in workers(cfg).items():
        assert name not in v["resources"], f"worker type {k} offers {name}: drivers could land on a spot node"


def check_data_workers(cfg: dict, data_cfg) -> list[str]:
    cpu_types = [k for k, v in workers(cfg).items()
                 if v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) >= data_cfg.cpus_per_actor]
    assert cpu_types, f"no CPU-only worker type with >= data.cpus_per_actor={data_cfg.cpus_per_actor} CPUs"
    return cpu_types


def check_spot(cfg: dict) -> None:
    assert not is_spot(cfg, head(cfg)), "the head must be on-demand"
    nc = head(cfg)["node_config"]
    assert "InstanceMarketOptions" not in nc and "scheduling" not in nc, "market/scheduling options on the head"
    for k, v in workers(cfg).items():
        assert is_spot(cfg, v), f"worker type {k} is not spot/preemptible"


def check_ray_pinned(cfg: dict, version: str) -> None:
    pins = re.findall(r"\bray(?:\[[a-z,\s]*\])?==([\w.]+)", " ".join(cfg["setup_commands"]))
    assert pins and set(pins) == {version}, f"setup_commands pin ray=={pins}, not ray=={version}"
    docker = cfg.get("docker") or {}
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [v.get("docker", {}).get("worker_image") for v in cfg["available_node_types"].values()]
    for image in filter(None, images):
        assert image.startswith(f"rayproject/ray:{version}-"), f"image {image} is not Ray {version}"


def check_spot_watcher(cfg: dict) -> list[str]:
    """The worker start commands launch the watcher for this provider, in the background, with valid flags."""
    provider = cfg["provider"]["type"]
    cmds = [c for c in cfg["worker_start_ray_commands"] if "pipelines.spot_watcher" in c]
    assert len(cmds) == 1, f"expected one spot watcher command, got {cmds}"
    starts = [i for i, c in enumerate(cfg["worker_start_ray_commands"]) if "ray start" in c]
    assert starts and cfg["worker_start_ray_commands"].index(cmds[0]) > starts[-1], "watcher before ray start"
    assert "spot_watcher" not in " ".join(cfg["head_start_ray_commands"]), "the on-demand head needs no watcher"
    assert cmds[0].rstrip().endswith("&") and "nohup" in cmds[0], "the watcher must run in the background"
    words = shlex.split(cmds[0].split("spot_watcher", 1)[1].split(">", 1)[0])
    args = build_parser().parse_args(words)  # SystemExit on a flag the watcher does not have
    assert args.provider == provider, f"watcher --provider {args.provider} on a {provider} cluster"
    return words


def check_project_install(cfg: dict) -> None:
    mounts = {remote: local for remote, local in cfg["file_mounts"].items() if local in (".", "./")}
    assert len(mounts) == 1, f"the repository root is not synced: {cfg['file_mounts']}"
    remote = next(iter(mounts))
    assert f"pip install -q -e {remote}" in cfg["setup_commands"] or any(
        re.search(rf"pip install .*-e {re.escape(remote)}\b", c) for c in cfg["setup_commands"]), "no editable install"
    assert any(remote in c and "spot_watcher" in c for c in cfg["worker_start_ray_commands"])


def check_shm(cfg: dict) -> None:
    docker = cfg["docker"]
    shared = docker.get("run_options", [])
    assert shm_bytes(shared + docker.get("head_run_options", [])) >= 2**30, "head: no --shm-size >= 1 GiB"
    for k, v in workers(cfg).items():
        opts = v.get("docker", {}).get("worker_run_options", docker.get("worker_run_options", []))
        assert shm_bytes(shared + opts) >= 2**30, f"{k}: no --shm-size >= 1 GiB"


# ---- tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_cfg():
    return load_config("vit_small_16")


def test_both_cloud_files_are_shipped():
    assert {p.name for p in CLUSTER_FILES} >= {"cluster.yaml", "cluster.gcp.yaml"}
    assert {load(p)["provider"]["type"] for p in CLUSTER_FILES} >= {"aws", "gcp"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_launcher_accepts_the_file(path):
    cfg = prepared(load(path))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert head(cfg)["max_workers"] == 0  # filled in by prepare_config: the head type is never a worker
    total_max = sum(v["max_workers"] for v in workers(cfg).values())
    assert total_max <= cfg["max_workers"], "node-type max_workers exceed the cluster's max_workers"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_matches_the_training_config(path, train_cfg):
    cfg = prepared(load(path))
    gpu_types = check_gpu_workers(cfg, train_cfg.train)
    check_driver_resource(cfg, train_cfg.train.driver_resource or DRIVER_RESOURCE)
    cpu_types = check_data_workers(cfg, train_cfg.data)
    assert not set(gpu_types) & set(cpu_types)
    check_spot(cfg)
    check_ray_pinned(cfg, ray.__version__)
    check_spot_watcher(cfg)
    check_project_install(cfg)
    check_shm(cfg)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_elastic_range_in_the_guide_fits_the_gpu_fleet(path, train_cfg):
    """docs/deployment.md's elastic example (--set train.num_workers=[lo,hi]) must fit the GPU node types."""
    text = DEPLOYMENT_DOC.read_text()
    m = re.search(r"train\.num_workers=\[(\d+),\s*(\d+)\]", text)
    assert m, "the guide shows no elastic train.num_workers=[min,max] example"
    lo, hi = int(m.group(1)), int(m.group(2))
    cfg = prepared(load(path))
    per_worker = train_cfg.train.gpus_per_worker
    capacity = sum(v["max_workers"] * int(v["resources"]["GPU"] // per_worker)
                   for v in workers(cfg).values() if v["resources"].get("GPU", 0) > 0)
    assert 1 <= lo <= hi <= capacity, f"num_workers {lo}..{hi} vs {capacity} GPU workers at most"


def test_guide_submits_drivers_to_the_head_resource():
    text = DEPLOYMENT_DOC.read_text()
    found = re.findall(r"--entrypoint-resources '(\{[^']*\})'", text)
    assert found, "the guide never passes --entrypoint-resources"
    for js in found:
        assert list(json.loads(js)) == [DRIVER_RESOURCE]
    for path in CLUSTER_FILES:
        assert DRIVER_RESOURCE in load(path)["available_node_types"][load(path)["head_node_type"]]["resources"]


# ---- negative checks: the validator and the checks really reject broken variants ----------------------


@pytest.fixture(scope="module")
def aws() -> dict:
    return load(REPO / "cluster.yaml")


def _gpu_type(raw: dict) -> str:
    return next(k for k, v in raw["available_node_types"].items() if v["resources"].get("GPU", 0) > 0)


def test_launcher_rejects_fractional_gpu(aws):
    bad = copy.deepcopy(aws)
    bad["available_node_types"][_gpu_type(bad)]["resources"]["GPU"] = 0.5
    with pytest.raises(Exception, match="is not of type 'integer'"):
        prepared(bad)


def test_launcher_rejects_unknown_node_type_key_and_missing_head(aws):
    bad = copy.deepcopy(aws)
    bad["available_node_types"][_gpu_type(bad)]["start_commands"] = ["echo per-type start commands do not exist"]
    with pytest.raises(Exception, match="Additional properties are not allowed"):
        prepared(bad)
    bad = copy.deepcopy(aws)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(bad)
    bad = copy.deepcopy(aws)
    del bad["available_node_types"][_gpu_type(bad)]["resources"]
    with pytest.raises(Exception, match="'resources' is a required property"):
        prepared(bad)


def test_checks_reject_broken_variants(aws, train_cfg):
    t, d = train_cfg.train, train_cfg.data
    gpu = _gpu_type(aws)

    def broken(mutate) -> dict:
        raw = copy.deepcopy(aws)
        mutate(raw)
        return prepared(raw)

    with pytest.raises(AssertionError, match="GPU"):
        check_gpu_workers(broken(lambda r: r["available_node_types"][gpu]["resources"].update(GPU=0)), t)
    with pytest.raises(AssertionError, match="lack TRAIN_DRIVER"):
        check_driver_resource(broken(lambda r: r["available_node_types"]["head"]["resources"].pop("TRAIN_DRIVER")),
                              "TRAIN_DRIVER")
    with pytest.raises(AssertionError, match="spot node"):
        check_driver_resource(broken(lambda r: r["available_node_types"][gpu]["resources"].update(TRAIN_DRIVER=1)),
                              "TRAIN_DRIVER")
    with pytest.raises(AssertionError, match="CPU-only"):
        check_data_workers(broken(lambda r: r["available_node_types"]["cpu_spot"]["resources"].update(GPU=1)), d)
    with pytest.raises(AssertionError, match="not spot"):
        check_spot(broken(lambda r: r["available_node_types"][gpu]["node_config"].pop("InstanceMarketOptions")))
    with pytest.raises(AssertionError, match="head must be on-demand"):
        check_spot(broken(lambda r: r["available_node_types"]["head"]["node_config"].update(
            InstanceMarketOptions={"MarketType": "spot"})))
    with pytest.raises(AssertionError, match="ray=="):
        check_ray_pinned(prepared(aws), "9.9.9")
    with pytest.raises(SystemExit):  # a flag the watcher does not have
        check_spot_watcher(broken(lambda r: r.update(worker_start_ray_commands=[
            c.replace("--interval 5", "--poll-every 5") for c in r["worker_start_ray_commands"]])))
    gcp_with_aws_watcher = prepared(load(REPO / "cluster.gcp.yaml"))
    gcp_with_aws_watcher["worker_start_ray_commands"] = aws["worker_start_ray_commands"]
    with pytest.raises(AssertionError, match="--provider aws on a gcp"):
        check_spot_watcher(gcp_with_aws_watcher)
    with pytest.raises(AssertionError, match="shm-size"):
        check_shm(broken(lambda r: r["available_node_types"][gpu]["docker"].update(worker_run_options=[])))


def test_shm_size_parser():
    assert shm_bytes(["--shm-size=12g"]) == 12 * 2**30
    assert shm_bytes(["--ulimit nofile=1:1", "--shm-size='1073741824b'"]) == 2**30
    assert shm_bytes(["--shm-size 512m"]) == 512 * 2**20
    assert shm_bytes(["--ipc=host"]) == 0
