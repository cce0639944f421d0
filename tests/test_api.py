"""The Python API (ibot_ray/api.py) on a real local Ray: ``ibot_ray.pretrain`` runs what ``ibot-ray pretrain`` runs and
returns its paths, final metrics and health verdict; ``ibot_ray.evaluate`` returns what ``ibot-ray eval --json``
writes; ``ibot_ray.load_backbone`` gives the timm model of an export and of a checkpoint. The one tiny run also logs
to all three trackers (TensorBoard, MLflow, W&B offline), read back with their own clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_images, write_parquet
from test_pretrain import TINY
from test_trackers import mlflow_history, mlflow_runs, wandb_offline_run

import ibot_ray
from ibot_ray.cli import main as cli
from ibot_ray.config import ConfigError
from ibot_ray.health import verdict
from pipelines.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
#: tests/test_pretrain.py's tiny run (2 blocks, 32 px crops, batch 16, 2 workers, 1 actor) as dotted keywords
TINY_KWARGS = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in TINY)
               if k not in ("data.eval_source", "train.knn_every_epochs")}


def test_import_ibot_ray_stays_ray_free():
    code = ("import sys, ibot_ray; ibot_ray.pretrain, ibot_ray.evaluate, ibot_ray.load_backbone; "
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'pipelines', 'tune'))); "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_data")
    write_images(root / "images", 96, kinds=("jpeg", "png", "webp"), size=(40, 40))  # unlabelled: 6 steps/epoch
    write_parquet(root / "bank.parquet", 60, kinds=("jpeg", "png"), seed=1)  # labelled (row % 3): the k-NN splits
    write_parquet(root / "queries.parquet", 30, kinds=("jpeg", "png"), seed=2)
    return root


@pytest.fixture(scope="module")
def api_run(ray_cluster, splits, tmp_path_factory):
    os.environ["WANDB_SILENT"] = "true"
    storage = tmp_path_factory.mktemp("api_runs")
    run = ibot_ray.pretrain(
        data={"source": str(splits / "images"), "eval_source": str(splits / "queries.parquet"),
              "eval_train_source": str(splits / "bank.parquet")},
        config="demo", storage=storage, name="api", optim={"epochs": 2},
        train={"loggers": ["tensorboard", "mlflow", "wandb"], "wandb_mode": "offline", "knn_every_epochs": 1},
        **TINY_KWARGS)
    return storage, run


def test_pretrain_returns_the_paths_the_metrics_and_the_health(api_run):
    storage, run = api_run
    assert run.name == "api" and Path(run.path) == (storage / "api").resolve()
    assert run.steps == 12 and run.metrics["step"] == 12  # 96 images // 16 = 6 steps/epoch, 2 epochs
    assert (Path(run.checkpoint) / "state.pt").is_file() and Path(run.checkpoint).parent == Path(run.path)
    assert Path(run.export).is_file() and run.export.endswith("export/teacher_backbone.safetensors")
    assert run.health == verdict(run.metrics) and run.health.startswith("healthy: no collapse detected")
    assert set(run.knn) == {"teacher", "teacher_top5", "random_init", "raw_pixels"}
    assert run.knn_split.startswith("split ") and run.knn_split.endswith("queries.parquet (30 images)")
    assert all(0 <= v <= 100 for v in run.knn.values())
    rows = read_metrics(Path(run.logs) / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r][-1] == 12
    assert run.metrics["loss"] == pytest.approx([r for r in rows if "loss" in r][-1]["loss"])


def test_the_run_reaches_every_tracker(api_run):
    _, run = api_run
    logs = Path(run.logs)
    rows = [r for r in read_metrics(logs / "metrics.jsonl") if "loss" in r]
    knn = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    assert sorted(knn) == [6, 12]  # the online k-NN after each epoch
    client, runs = mlflow_runs(logs)
    assert len(runs) == 1 and runs[0].info.run_name == "api" and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    assert mlflow_history(client, rid, "loss") == pytest.approx({r["step"]: r["loss"] for r in rows})
    assert mlflow_history(client, rid, "teacher_entropy_frac") == pytest.approx(
        {r["step"]: r["teacher_entropy_frac"] for r in rows})
    assert mlflow_history(client, rid, "knn_top1") == pytest.approx(knn)
    params = runs[0].data.params
    assert params["optim.epochs"] == "2" and params["model.depth"] == "2"
    assert params["optim.warmup_epochs"] == "1"  # the resolved config (auto fields derived), as the run used it
    assert runs[0].data.tags["health"] == rows[-1]["health"]
    wb = wandb_offline_run(logs)
    assert [h["step"] for h in wb["history"] if "loss" in h] == [r["step"] for r in rows]
    assert {h["step"]: h["loss"] for h in wb["history"] if "loss" in h} == pytest.approx(
        {r["step"]: r["loss"] for r in rows})
    assert {h["step"]: h["knn_top1"] for h in wb["history"] if "knn_top1" in h} == pytest.approx(knn)
    assert wb["config"]["optim"]["epochs"] == 2 and wb["summary"]["health"] == rows[-1]["health"]
    assert list((logs / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluate_returns_what_eval_json_writes(api_run, splits, tmp_path):
    _, run = api_run
    train, val = str(splits / "bank.parquet"), str(splits / "queries.parquet")
    report = ibot_ray.evaluate(run, train=train, val=val, eval={"knn_k": 5})
    out = tmp_path / "eval.json"
    assert cli(["eval", run.checkpoint, "--train", train, "--val", val, "--set", "eval.knn_k=5", "--json",
                str(out)]) == 0
    written = json.loads(out.read_text())
    report.pop("timings_s"), written.pop("timings_s")
    assert report == written
    assert report["knn"]["k"] == 5 and report["val"]["images"] == 30 and report["linear"] is not None
    assert set(report["gains"]) >= {"knn_top1_over_pixel_knn", "knn_top1_over_random_init_knn"}
    with pytest.raises(ConfigError, match="eval.knn_kk: unknown field"):
        ibot_ray.evaluate(run, train=train, val=val, eval={"knn_kk": 5})


def test_load_backbone_gives_the_same_timm_model_from_the_export_and_the_checkpoint(api_run):
    import timm

    _, run = api_run
    models = [ibot_ray.load_backbone(p) for p in (run.export, run.checkpoint, run.path, run)]
    x = torch.randn(3, 3, 32, 32)
    feats = []
    for m in models:
        assert isinstance(m, timm.models.vision_transformer.VisionTransformer) and len(m.blocks) == 2
        with torch.no_grad():
            feats.append(m.eval()(x))
    assert feats[0].shape == (3, 96)
    for f in feats[1:]:
        torch.testing.assert_close(f, feats[0])


def test_a_bad_override_is_a_config_error_before_ray(tmp_path):
    """Raised while the config resolves, before any Ray call: no run folder is made. (The source does not exist: were
    an override not checked, the run would stop at listing it, with another error, instead of training.)"""
    for kwargs, match in (({"optim": {"epoch": 2}}, "optim.epoch: unknown field"),
                          ({"epochs": 2}, "epochs: not a config section"),
                          ({"optim": 2}, "optim: expected a dict"),
                          ({"train.loggers": ["comet"]}, "unknown logger 'comet'")):
        with pytest.raises(ConfigError, match=match):
            ibot_ray.pretrain(data=str(tmp_path / "no_images"), storage=tmp_path / "runs", name="bad",
                              **{"data.eval_source": None, **kwargs})
    assert not list(tmp_path.iterdir())
