"""Offline checks of the shipped cluster YAMLs (cluster.yaml for AWS, cluster.gcp.yaml for GCP).

1. Ray's own launcher validation, exactly what ``ray up`` runs before it touches the cloud:
   ``prepare_config`` (merge the provider's defaults.yaml) then ``validate_config`` (ray-schema.json + node-type
   checks). Broken variants must be rejected, so this check can fail.
2. What the training config needs from the cluster: GPU worker nodes with at least ``train.gpus_per_worker`` GPUs,
   a head that alone carries the driver resource (TRAIN_DRIVER), a CPU-only worker type for Ray Data with at least
   ``data.cpus_per_actor`` CPUs, spot/preemptible workers and an on-demand head, ray pinned to the installed version,
   the spot watcher started on workers with flags its parser accepts, the project synced and installed, and an
   explicit /dev/shm size for the object store, and worker nodes that run with their own cloud identity (not the
   head's) which the guide lets the head pass to them (AWS: iam:PassRole on exactly the workers' role).
3. Placement, through the run planner fed with the prepared file (what the head's ~/ray_bootstrap_config.yaml
   holds): the head offers no CPU and no GPU to Train or Data, Data's crop actors are pinned to the CPU-only node
   type (its DATA_CPU resource, which neither the head nor a GPU type has), and the GPU preset trains on the GPU
   nodes although they start at zero. Each check is a function that the negative tests also run on broken copies.
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
from pipelines.cluster_plan import DATA_RESOURCE, plan_run, shape_from_autoscaler_config
from pipelines.spot_watcher import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))
# The deployment guide.
DEPLOYMENT_DOC = REPO / "docs" / "deploying.md"
DRIVER_RESOURCE = "TRAIN_DRIVER"  # the name the guide passes to --entrypoint-resources
# What `ray up` gives the head when its node_config names no profile / service account (Ray's
# autoscaler/_private/aws/config.py DEFAULT_RAY_IAM_ROLE, gcp/config.py DEFAULT_SERVICE_ACCOUNT_ID; those modules
# import boto3 / googleapiclient, so the names are read from their source).
_RAY_AUTOSCALER = Path(ray.__file__).parent / "autoscaler" / "_private"
assert 'RAY = "ray-autoscaler"' in (_RAY_AUTOSCALER / "aws" / "config.py").read_text()
assert 'DEFAULT_RAY_IAM_ROLE = RAY + "-v1"' in (_RAY_AUTOSCALER / "aws" / "config.py").read_text()
AWS_DEFAULT_HEAD_ROLE = "ray-autoscaler-v1"
assert 'DEFAULT_SERVICE_ACCOUNT_ID = RAY + "-sa-" + VERSION' in (_RAY_AUTOSCALER / "gcp" / "config.py").read_text()
GCP_DEFAULT_HEAD_ACCOUNT = "ray-autoscaler-sa-v1"
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


def check_placement(cfg: dict, preset) -> None:
    """Train workers on the GPU nodes (GPU training planned from the node types, though they start at zero), Data's
    crop actors pinned to the CPU-only type, nothing schedulable on the head."""
    res = head(cfg)["resources"]
    assert res.get("CPU", None) == 0, f"the head offers {res.get('CPU', 'all its')} CPUs to Data and Train"
    assert DATA_RESOURCE not in res, f"the head offers {DATA_RESOURCE}: crop actors could land beside the drivers"
    for k, v in workers(cfg).items():
        if v["resources"].get("GPU", 0) > 0:
            assert DATA_RESOURCE not in v["resources"], f"{k}: crop actors could fill the GPU nodes' CPUs"
    plan = plan_run(preset, shape_from_autoscaler_config(cfg))
    assert plan.use_gpu, "the GPU preset would train on CPU"
    gpus = sum(v["max_workers"] * v["resources"].get("GPU", 0) for v in workers(cfg).values())
    assert plan.num_workers[1] == gpus // preset.train.gpus_per_worker, f"{plan.num_workers} for {gpus} GPUs"
    assert plan.actor_resource == DATA_RESOURCE, "Data's crop actors are not pinned to a CPU node type"
    pinned = [k for k, v in workers(cfg).items() if v["resources"].get(DATA_RESOURCE)]
    assert pinned and all(workers(cfg)[k]["resources"].get("GPU", 0) == 0 for k in pinned)
    share = -(-preset.optim.batch_size // plan.num_workers[0])
    assert (plan.micro_batch_size or share) <= plan.images_per_device, "a rank's batch does not fit a GPU"


def _guide_policies(text: str) -> dict[str, dict]:
    """The IAM policy documents the guide shows: ``{file name: JSON}`` for "`name.json` ... ```json ...```"."""
    found = re.findall(r"`([\w.-]+\.json)`[^`]*?```json\n(.*?)```", text, flags=re.S)
    return {name: json.loads(body) for name, body in found}


def _statements(policy: dict) -> list[dict]:
    st = policy.get("Statement", [])
    return st if isinstance(st, list) else [st]


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def _guide_commands(text: str) -> str:
    """The guide's shell commands with line continuations joined."""
    return re.sub(r"[ \t]*\\\n\s*", " ", text)


def check_aws_worker_profile(cfg: dict, guide: str) -> str:
    """AWS: the workers run with their own instance profile, never the head's (which holds EC2 full access and is
    not passable by the head itself); the guide creates it (role and profile of the same name, S3-only policy) and
    gives the head's role an iam:PassRole on exactly that role. Returns the workers' profile name."""
    head_profile = head(cfg)["node_config"].get("IamInstanceProfile", {})
    head_name = (head_profile.get("Arn", "").rsplit("/", 1)[-1] or head_profile.get("Name")
                 or AWS_DEFAULT_HEAD_ROLE)
    names = set()
    for k, v in workers(cfg).items():
        prof = v["node_config"].get("IamInstanceProfile")
        assert prof, f"{k}: no IamInstanceProfile (no S3 access for checkpoints)"
        name = prof.get("Arn", "").rsplit("/", 1)[-1] or prof.get("Name")
        assert name != head_name, f"{k}: workers use the head's instance profile {head_name}"
        names.add(name)
    assert len(names) == 1, f"worker profiles {names}: the guide documents one"
    worker = names.pop()
    cmds = _guide_commands(guide)
    assert re.search(rf"aws iam create-instance-profile --instance-profile-name {worker}\b", cmds), \
        f"the guide never creates the instance profile {worker}"
    assert re.search(rf"add-role-to-instance-profile --instance-profile-name {worker} --role-name {worker}\b", cmds)
    policies = _guide_policies(guide)
    passrole = [(f, st) for f, p in policies.items() for st in _statements(p)
                if "iam:PassRole" in _as_list(st.get("Action"))]
    assert passrole, "the guide documents no iam:PassRole for the head"
    role_arn = f"arn:aws:iam::YOUR-ACCOUNT-ID:role/{worker}"
    ok = [f for f, st in passrole if st.get("Effect") == "Allow" and _as_list(st["Resource"]) == [role_arn]]
    assert ok, f"no PassRole statement for exactly role/{worker}: {passrole}"
    assert re.search(rf"put-role-policy --role-name {head_name} .*file://{re.escape(ok[0])}", cmds), \
        f"the guide never attaches {ok[0]} to the head's role {head_name}"
    worker_files = re.findall(rf"put-role-policy --role-name {worker} .*?file://([\w.-]+\.json)", cmds)
    assert worker_files, f"the guide gives the role {worker} no policy"
    for f in worker_files:
        for st in _statements(policies[f]):
            for action in _as_list(st["Action"]):
                assert action.startswith("s3:") and action != "s3:*", f"worker policy grants {action}"
            for res in _as_list(st["Resource"]):
                assert res.startswith("arn:aws:s3:::YOUR-BUCKET"), f"worker policy reaches {res}"
    return worker


def check_gcp_worker_account(cfg: dict, guide: str) -> str:
    """GCP: the workers run as their own service account, created and bound to the bucket in the guide."""
    head_accounts = {a["email"] for a in head(cfg)["node_config"].get("serviceAccounts", [])} or {
        f"{GCP_DEFAULT_HEAD_ACCOUNT}@YOUR-PROJECT-ID.iam.gserviceaccount.com"}
    emails = set()
    for k, v in workers(cfg).items():
        accounts = v["node_config"].get("serviceAccounts", [])
        assert accounts, f"{k}: no service account (no bucket access)"
        for a in accounts:
            assert a["email"] not in head_accounts, f"{k}: workers use the head's service account {a['email']}"
            emails.add(a["email"])
    assert len(emails) == 1
    email = emails.pop()
    cmds = _guide_commands(guide)
    assert f"gcloud iam service-accounts create {email.split('@')[0]}" in cmds
    assert re.search(rf"add-iam-policy-binding gs://YOUR-BUCKET --member serviceAccount:{re.escape(email)}", cmds)
    return email


def check_worker_identity(cfg: dict, guide: str) -> str:
    if cfg["provider"]["type"] == "aws":
        return check_aws_worker_profile(cfg, guide)
    return check_gcp_worker_account(cfg, guide)


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
    check_placement(cfg, train_cfg)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_workers_have_their_own_identity_that_the_head_may_pass(path):
    cfg = prepared(load(path))
    check_worker_identity(cfg, DEPLOYMENT_DOC.read_text())
    for p in CLUSTER_FILES:  # comments point at the guide, which exists
        assert str(DEPLOYMENT_DOC.relative_to(REPO)) in p.read_text() and DEPLOYMENT_DOC.is_file()


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_elastic_range_in_the_guide_fits_the_gpu_fleet(path, train_cfg):
    """The guide's elastic example (--set train.num_workers=[lo,hi]) must fit the GPU node types."""
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
    head_profile = {"Arn": f"arn:aws:iam::YOUR-ACCOUNT-ID:instance-profile/{AWS_DEFAULT_HEAD_ROLE}"}
    guide = DEPLOYMENT_DOC.read_text()
    with pytest.raises(AssertionError, match="head's instance profile"):
        check_worker_identity(broken(lambda r: r["available_node_types"][gpu]["node_config"].update(
            IamInstanceProfile=head_profile)), guide)
    worker = check_worker_identity(prepared(aws), guide)
    with pytest.raises(AssertionError, match="PassRole"):
        check_worker_identity(prepared(aws), guide.replace("iam:PassRole", "iam:GetRole"))
    with pytest.raises(AssertionError, match="exactly role"):
        check_worker_identity(prepared(aws), guide.replace(f":role/{worker}", ":role/*"))
    with pytest.raises(AssertionError, match="worker policy grants"):
        check_worker_identity(prepared(aws), guide.replace('"s3:DeleteObject"', '"ec2:RunInstances"'))
    gcp = load(REPO / "cluster.gcp.yaml")
    gcp_gpu = _gpu_type(gcp)
    gcp["available_node_types"][gcp_gpu]["node_config"]["serviceAccounts"][0]["email"] = \
        f"{GCP_DEFAULT_HEAD_ACCOUNT}@YOUR-PROJECT-ID.iam.gserviceaccount.com"
    with pytest.raises(AssertionError, match="head's service account"):
        check_worker_identity(prepared(gcp), guide)
    with pytest.raises(AssertionError, match="head offers 8 CPUs"):
        check_placement(broken(lambda r: r["available_node_types"]["head"]["resources"].update(CPU=8)), train_cfg)
    with pytest.raises(AssertionError, match="fill the GPU nodes' CPUs"):
        check_placement(broken(lambda r: r["available_node_types"][gpu]["resources"].update(DATA_CPU=8)), train_cfg)
    with pytest.raises(AssertionError, match="not pinned"):
        check_placement(broken(lambda r: r["available_node_types"]["cpu_spot"]["resources"].pop("DATA_CPU")),
                        train_cfg)
    with pytest.raises(AssertionError, match="would train on CPU"):
        check_placement(prepared(aws), load_config("vit_small_16", ["train.use_gpu=false"]))
    with pytest.raises(AssertionError, match="does not fit a GPU"):
        check_placement(prepared(aws), load_config("vit_small_16", ["optim.micro_batch_size=0"]))
    with pytest.raises(AssertionError, match="shm-size"):
        check_shm(broken(lambda r: r["available_node_types"][gpu]["docker"].update(worker_run_options=[])))


def test_shm_size_parser():
    assert shm_bytes(["--shm-size=12g"]) == 12 * 2**30
    assert shm_bytes(["--ulimit nofile=1:1", "--shm-size='1073741824b'"]) == 2**30
    assert shm_bytes(["--shm-size 512m"]) == 512 * 2**20
    assert shm_bytes(["--ipc=host"]) == 0


def test_the_node_image_gets_no_repository_history_runs_or_secrets():
    """Dockerfile.cluster copies the build context (``COPY . /tmp/ibot-ray``): .dockerignore keeps version control,
    local runs and data, and credential files out of the image and the registry; boto3 is pinned with the rest."""
    root = REPO
    ignored = {line.strip() for line in (root / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "runs", "ibot_runs", "bench_data", ".env", ".aws", "**/*.pem"} <= ignored, ignored
    assert "COPY --chown=ray:users . /tmp/ibot-ray" in (root / "Dockerfile.cluster").read_text()
    pins = dict(line.split("==") for line in (root / "cluster-constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins.get("boto3") and pins.get("botocore")
    head_cmds = " ".join(load(root / "cluster.yaml")["head_setup_commands"])
    assert re.search(r"pip install .*-c \S*cluster-constraints\.txt .*boto3", head_cmds), head_cmds
