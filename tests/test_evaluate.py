"""``ibot-ray eval``: linear probe, raw-pixel baseline, shared label map, bad input, checkpoints and exports end to end.

Everything is real: images are written as files by the tests, checkpoints and exports are produced by the project's
own code on a tiny config, and the CLI runs through ``ibot_ray.cli.main``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_ray.checkpoint import save_checkpoint, training_state
from ibot_ray.cli import main
from ibot_ray.config import load_config
from ibot_ray.export import export_from_checkpoint
from ibot_ray.linear_probe import linear_probe
from ibot_ray.model import build_student_teacher
from pipelines.knn_eval import EvalDataError, KNNEvaluator, best_pixel_knn, open_labelled, open_labelled_pair

TINY = [
    "model.depth=2", "model.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "head.out_dim=256", "head.patch_out_dim=256", "head.hidden_dim=128",
    "head.bottleneck_dim=64", "optim.batch_size=16", "train.num_workers=[1,1]", "eval.image_size=32",
]
PATTERNS = ("checker", "horizontal", "vertical")


def pattern_image(kind: str, rng: np.random.Generator, size: int = 16, offset: float = 0.0) -> np.ndarray:
    """A grey image whose class is its pixel pattern (stripes / checkerboard with a random phase) plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    ph = int(rng.integers(0, 2))
    if kind == "horizontal":
        p = (yy // 2 + ph) % 2
    elif kind == "vertical":
        p = (xx // 2 + ph) % 2
    else:
        p = (yy // 2 + xx // 2 + ph) % 2
    img = 60 + 120 * p + offset + rng.normal(0, 20, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pattern_folder(root: Path, per_class: int, *, seed: int, classes=PATTERNS, offsets: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            off = float(rng.uniform(-50, 70)) if offsets else 0.0
            Image.fromarray(pattern_image(c, rng, offset=off)).save(root / c / f"{i:03d}.png")
    return root


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- linear probe ------------------------------------------------------------------------------------------------


def test_linear_probe_separable_features_and_random_labels():
    g = torch.Generator().manual_seed(0)
    d, c = 32, 4
    centres = torch.randn(c, d, generator=g) * 3

    def sample(n):
        y = torch.randint(0, c, (n,), generator=g)
        return centres[y] + torch.randn(n, d, generator=g) + 50.0, y  # a large common offset: standardisation

    xtr, ytr = sample(1200)
    xva, yva = sample(600)
    r = linear_probe(xtr.half(), ytr, xva.half(), yva)  # float16 storage works
    assert r["top1"] > 97.0 and r["top5"] == 100.0
    assert r["steps"] == 1000 and r["recipe"]["lr"] == 1e-3
    # Random labels: nothing to learn, val accuracy is at chance (25 %) even though the train set is memorised a bit.
    ytr_rand = torch.randint(0, c, (1200,), generator=g)
    yva_rand = torch.randint(0, c, (600,), generator=g)
    r = linear_probe(xtr, ytr_rand, xva, yva_rand)
    assert 15.0 < r["top1"] < 35.0
    assert r["train_top1"] > r["top1"]


# ---- labelled splits: one label map, clear errors ------------------------------------------------------------------


def test_shared_label_map_val_missing_a_class_and_unknown_class(tmp_path, image_writer):
    cfg = load_config("demo")
    image_writer(tmp_path / "train", 6, kinds=("png",), classes=["ant", "bee", "cat"])
    image_writer(tmp_path / "val", 4, kinds=("png",), classes=["ant", "cat"])  # no "bee"
    bank, queries = open_labelled_pair(str(tmp_path / "train"), str(tmp_path / "val"), cfg)
    assert bank.label_map.names == ("ant", "bee", "cat") and bank.label_map.num_classes == 3
    # Its own sorted map would make "cat" 1; the shared map keeps it 2.
    expect = {"ant": 0, "cat": 2}
    assert [expect[Path(p).parent.name] for p in queries.paths] == queries.labels.tolist()
    assert sorted(set(queries.labels.tolist())) == [0, 2]

    image_writer(tmp_path / "val2", 3, kinds=("png",), classes=["ant", "dog", "cat"])
    with pytest.raises(EvalDataError, match=r"val split .*val2.* class 'dog'.*train split does not have"):
        open_labelled_pair(str(tmp_path / "train"), str(tmp_path / "val2"), cfg)


def test_parquet_string_labels_share_the_train_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import image_bytes

    rng = np.random.default_rng(0)

    def write(path, labels):
        pq.write_table(pa.table({"image": pa.array([image_bytes("png", rng, (8, 8)) for _ in labels], pa.binary()),
                                 "label": pa.array(labels)}), str(path))

    write(tmp_path / "tr.parquet", ["zebra", "ant", "mole", "ant"])
    write(tmp_path / "va.parquet", ["mole", "zebra"])
    write(tmp_path / "bad.parquet", ["mole", "yak"])
    cfg = load_config("demo")
    bank, queries = open_labelled_pair(str(tmp_path / "tr.parquet"), str(tmp_path / "va.parquet"), cfg)
    assert bank.label_map.names == ("ant", "mole", "zebra")
    assert bank.labels.tolist() == [2, 0, 1, 0] and queries.labels.tolist() == [1, 2]
    with pytest.raises(EvalDataError, match="class 'yak'"):
        open_labelled_pair(str(tmp_path / "tr.parquet"), str(tmp_path / "bad.parquet"), cfg)


def test_unlabelled_splits_are_errors_naming_the_split(tmp_path, image_writer, parquet_writer):
    cfg = load_config("demo")
    image_writer(tmp_path / "flat", 3, kinds=("png",))
    with pytest.raises(EvalDataError, match=r"^val split .*flat.* is unlabelled: a flat image folder"):
        open_labelled(str(tmp_path / "flat"), cfg, split="val")
    parquet_writer(tmp_path / "nolabel.parquet", 3, kinds=("png",), with_label=False)
    with pytest.raises(EvalDataError, match=r"^train split .*nolabel.parquet.* no label column 'label'"):
        open_labelled(str(tmp_path / "nolabel.parquet"), cfg, split="train")


def test_max_images_is_round_robin_over_classes(tmp_path, parquet_writer):
    parquet_writer(tmp_path / "s.parquet", 30, kinds=("png",))  # labels 0,1,2,0,1,2,...
    src = open_labelled(str(tmp_path / "s.parquet"), load_config("demo"), max_images=7)
    assert len(src) == 7 and sorted(np.bincount(src.labels).tolist()) == [2, 2, 3]


# ---- the raw-pixel baseline --------------------------------------------------------------------------------------


def test_pixel_baseline_on_pattern_images(tmp_path):
    train = write_pattern_folder(tmp_path / "train", 20, seed=0, offsets=True)
    val = write_pattern_folder(tmp_path / "val", 10, seed=1, offsets=True)
    cfg = load_config("demo", [f"data.eval_train_source={train}", f"data.eval_source={val}"])
    ev = KNNEvaluator(cfg)
    r = ev.pixel_baseline()
    assert r["view"] == "as stored 16x16x1"  # grey 16 px images are compared as stored, one channel
    assert r["knn_top1"] > 95.0
    # Shuffled train labels: the same baseline drops to chance, so the number above measures the patterns.
    rng = np.random.default_rng(0)
    ev.bank.source.labels = rng.permutation(ev.bank.source.labels)
    ev._pixel = None
    assert ev.pixel_baseline()["knn_top1"] < 60.0


def test_pixel_baseline_reports_the_better_variant():
    cfg = load_config("demo")
    g = torch.Generator().manual_seed(0)
    yb, yq = torch.arange(60) % 3, torch.arange(30) % 3
    good_b = torch.eye(3)[yb] + 0.1 * torch.randn(60, 3, generator=g)
    good_q = torch.eye(3)[yq] + 0.1 * torch.randn(30, 3, generator=g)
    noise_b, noise_q = torch.randn(60, 3, generator=g), torch.randn(30, 3, generator=g)
    r = best_pixel_knn({"raw": noise_b, "centred": good_b}, yb, {"raw": noise_q, "centred": good_q}, yq, cfg, 3)
    assert r["variant"] == "centred" and r["top1"] == 100.0 and r["raw"]["top1"] < 70.0
    r = best_pixel_knn({"raw": good_b, "centred": noise_b}, yb, {"raw": good_q, "centred": noise_q}, yq, cfg, 3)
    assert r["variant"] == "raw" and r["top1"] == 100.0


# ---- the CLI on real checkpoints and exports ---------------------------------------------------------------------


#: the four networks of the run folder's two checkpoints: four random initialisations (seed per network), none of
#: them train.seed's (the random-init baseline). Eval and export must read step 12's teacher.
NETWORK_SEEDS = {"teacher12": 1234, "student12": 1, "teacher3": 3, "student3": 2}
FM_TRAIN, FM_VAL = 120, 60  # Fashion-MNIST images per split (10 classes)


def write_demo_folder(root: Path, split: str, n: int) -> Path:
    """The first ``n`` images of the shipped Fashion-MNIST sample's ``split`` as an ImageFolder (PNG files)."""
    import pyarrow.parquet as pq

    from pipelines.sources import DEMO_CLASS_NAMES, DEMO_DIR

    t = pq.read_table(DEMO_DIR / f"{split}.parquet").slice(0, n)
    for i, (png, label) in enumerate(zip(t.column("image").to_pylist(), t.column("label").to_pylist())):
        folder = root / DEMO_CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(png)
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with two step_* checkpoints (written by ibot_ray.checkpoint) whose four networks all differ
    (:data:`NETWORK_SEEDS`), Fashion-MNIST train/val folders (one undecodable file in train), and the k-NN numbers
    each network gets on them from the online k-NN's code (``knn``). The fixture checks that step 12's teacher gets
    numbers none of the other three gets: eval or export reading the student, or step 3, cannot pass."""
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config("demo", TINY)
    nets = {}
    for name, seed in NETWORK_SEEDS.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student, teacher = build_student_teacher(cfg)  # the same weights: one of them is kept
        nets[name] = teacher if name.startswith("teacher") else student
    for step in (3, 12):
        student, teacher = nets[f"student{step}"], nets[f"teacher{step}"]
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
        d = root / "run" / f"step_{step:08d}"
        state = training_state(student=student, teacher=teacher, optimizer=opt, loss=torch.nn.Module(), epoch=0,
                               step=step, config=cfg)
        save_checkpoint(d / "state.pt", state)
        cfg.save(d / "config.yaml")
    train = write_demo_folder(root / "train", "train", FM_TRAIN)
    (train / "coat" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    val = write_demo_folder(root / "val", "test", FM_VAL)
    eval_cfg = load_config("demo", TINY + [f"data.eval_train_source={train}", f"data.eval_source={val}"])
    ev = KNNEvaluator(eval_cfg)
    knn = {name: ev.evaluate(net.backbone) for name, net in nets.items()}
    assert all(knn[name] != knn["teacher12"] for name in knn if name != "teacher12"), knn
    return {"root": root, "run": root / "run", "cfg": cfg, "eval_cfg": eval_cfg, "evaluator": ev, "knn": knn,
            "train": train, "val": val}


def test_cli_eval_checkpoint_run_folder(tiny_run, capsys):
    out_json = tiny_run["root"] / "res.json"
    code, out, err = run_cli([
        "eval", str(tiny_run["run"]), "--train", str(tiny_run["train"]), "--val", str(tiny_run["val"]),
        "--device", "cpu", "--json", str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert "step_00000012" in r["model"]["spec"] and r["model"]["kind"] == "checkpoint"  # the latest checkpoint
    assert r["train"]["images"] == FM_TRAIN and r["train"]["skipped"] == 1 and "zz_broken.png" in r["train"][
        "skipped_examples"][0]
    assert r["val"]["images"] == FM_VAL and r["num_classes"] == 10
    assert r["feature_dim"] == load_config("demo").model.embed_dim  # the run's (narrow) backbone
    assert r["pixel_knn"]["view"] == "as stored 28x28x1"
    for key in ("knn", "linear", "random_init_knn"):
        assert 0.0 <= r[key]["top1"] <= r[key]["top5"] <= 100.0
    assert r["gains"]["knn_top1_over_pixel_knn"] == pytest.approx(r["knn"]["top1"] - r["pixel_knn"]["top1"])
    assert r["gains"]["knn_top1_over_random_init_knn"] == pytest.approx(
        r["knn"]["top1"] - r["random_init_knn"]["top1"])
    for label in ("k-NN (k=20, T=0.07)", "linear probe", "raw-pixel k-NN", "random-init k-NN", "gain over raw pixels",
                  "skipped 1 undecodable"):
        assert label in out
    assert f"{r['knn']['top1']:.2f}" in out

    # The online k-NN is the same code: KNNEvaluator on the same splits gives the same numbers for step 12's teacher
    # (and other numbers for its student and for step 3's networks: the fixture checked), and its random-init number
    # is the run's initial teacher (train.seed).
    assert tiny_run["knn"]["teacher12"] == {"knn_top1": r["knn"]["top1"], "knn_top5": r["knn"]["top5"]}
    ev = tiny_run["evaluator"]
    torch.manual_seed(tiny_run["eval_cfg"].train.seed)
    _, teacher0 = build_student_teacher(tiny_run["eval_cfg"])
    assert ev.evaluate(teacher0.backbone)["knn_top1"] == r["random_init_knn"]["top1"]
    pix = ev.pixel_baseline()
    assert (pix["knn_top1"], pix["variant"]) == (r["pixel_knn"]["top1"], r["pixel_knn"]["variant"])


def test_cli_eval_export_matches_checkpoint(tiny_run, capsys):
    ckpt = tiny_run["run"] / "step_00000012" / "state.pt"
    export = export_from_checkpoint(ckpt, tiny_run["root"] / "teacher.safetensors")
    args = ["--train", str(tiny_run["train"]), "--val", str(tiny_run["val"]), "--no-baselines", "--no-linear"]
    code, _, err = run_cli(["eval", str(ckpt), *args, "--json", str(tiny_run["root"] / "c.json")], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", str(export), *args, "--json", str(tiny_run["root"] / "e.json")], capsys)
    assert code == 0, err
    c = json.loads((tiny_run["root"] / "c.json").read_text())
    e = json.loads((tiny_run["root"] / "e.json").read_text())
    assert e["model"]["kind"] == "export" and e["eval_image_size"] == 32  # the export's recorded crop size
    assert e["knn"] == c["knn"]  # same weights, bit-identical features (test_export.py): the same numbers exactly
    # ... and they are step 12's teacher's: an export of the student gets other numbers (the fixture checked)
    assert tiny_run["knn"]["teacher12"] == {"knn_top1": e["knn"]["top1"], "knn_top5": e["knn"]["top5"]}
    assert e["linear"] is None and e["pixel_knn"] is None and "raw-pixel" not in out


def test_cli_eval_linear_probe_reads_the_train_split_and_its_labels(tiny_run, tmp_path, capsys):
    """The CLI's linear probe trains on --train's features with their own labels and scores --val's. Pattern images
    (stripes / checkerboard) are linearly separable in any random ViT's features (k-NN and probe are 100 % on them),
    so with 3 of the 27 val images filed under another class than their pattern the val top-1 is exactly 24 / 27,
    and the train top-1 100 %. Swapped splits (train on val, 3 labels wrong; score the clean train split) or labels
    not aligned with their images give other numbers; a train split with shuffled labels scores near chance."""
    train = write_pattern_folder(tmp_path / "train", 16, seed=0)
    val = write_pattern_folder(tmp_path / "val", 8, seed=1)
    rng = np.random.default_rng(2)
    for kind, filed_as in zip(PATTERNS, PATTERNS[1:] + PATTERNS[:1]):  # one image of each pattern mislabelled
        Image.fromarray(pattern_image(kind, rng)).save(val / filed_as / f"zz_{kind}.png")
    shuffled = tmp_path / "shuffled"
    for i, (cls, img) in enumerate(zip(rng.permutation(np.repeat(PATTERNS, 16)), sorted(train.glob("*/*.png")))):
        (shuffled / cls).mkdir(parents=True, exist_ok=True)
        (shuffled / cls / f"{i:03d}.png").write_bytes(img.read_bytes())
    ckpt = str(tiny_run["run"] / "step_00000012" / "state.pt")
    results = {}
    for name, split in (("clean", train), ("shuffled", shuffled)):
        out_json = tmp_path / f"{name}.json"
        code, _, err = run_cli(["eval", ckpt, "--train", str(split), "--val", str(val), "--no-baselines",
                                "--json", str(out_json)], capsys)
        assert code == 0, err
        results[name] = json.loads(out_json.read_text())
    r = results["clean"]
    assert (r["train"]["images"], r["val"]["images"]) == (48, 27)
    assert r["linear"]["top1"] == pytest.approx(100 * 24 / 27) and r["linear"]["train_top1"] == 100.0
    assert r["knn"]["top1"] == pytest.approx(100 * 24 / 27)  # the k-NN reads the same features and labels
    assert results["shuffled"]["linear"]["top1"] < 60.0  # chance is 33 %: the numbers above measure the labels


def test_cli_eval_bad_input_exits_2_with_one_line(tiny_run, tmp_path, image_writer, capsys):
    image_writer(tmp_path / "flat", 3, kinds=("png",))
    tr, va = str(tiny_run["train"]), str(tiny_run["val"])
    cases = [
        (["no_such_model_xyz", "--train", tr, "--val", va], "neither a file/folder nor a timm model name"),
        ([str(tmp_path / "missing.pt"), "--train", tr, "--val", va], "does not exist"),
        (["vit_tiny_patch16_224", "--train", str(tmp_path / "nope"), "--val", va], "train split"),
        (["vit_tiny_patch16_224", "--train", tr, "--val", str(tmp_path / "flat")], "val split"),
    ]
    for argv, expected in cases:
        code, out, err = run_cli(["eval", *argv, "--config", "demo", "--set", "model.depth=1"], capsys)
        lines = [ln for ln in err.splitlines() if not ln.startswith("ibot-ray eval: note:")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (argv, err)
    assert "unlabelled" in lines[0] and str(tmp_path / "flat") in lines[0]


def test_cli_eval_timm_name_is_random_init(tiny_run, capsys):
    code, out, err = run_cli(["eval", "vit_tiny_patch16_224", "--config", "demo", "--set", "model.depth=1",
                              "--train", str(tiny_run["train"]), "--val", str(tiny_run["val"]), "--no-linear",
                              "--max-images", "12", "--json", str(tiny_run["root"] / "t.json")], capsys)
    assert code == 0, err
    assert "random initialisation (pretrained=False" in err
    r = json.loads((tiny_run["root"] / "t.json").read_text())
    assert r["train"]["selected"] == 12 and r["val"]["selected"] == 12
    # A timm name is the random init with train.seed: exactly the random-init baseline.
    assert r["knn"]["top1"] == r["random_init_knn"]["top1"]


def test_eval_and_the_online_knn_decode_alike_on_large_jpegs(tmp_path):
    """``ibot-ray eval`` and the run's online k-NN give the same model k-NN and the same raw-pixel baseline on JPEGs
    large enough for draft decoding: each view is decoded at its own draft scale (the eval view at 96 px wants a
    shorter side >= 110, the 32 px pixel view >= 37), in both code paths. Random labels make every figure hang on
    the exact neighbour order, so any difference in the decoded pixels shows."""
    from conftest import write_images

    from pipelines.evaluate import LoadedModel, evaluate

    def folder(root: Path, seed: int) -> Path:
        write_images(root, 48, kinds=("jpeg",), classes=["a", "b", "c"], seed=seed, size=(320, 400))
        return root

    train, val = folder(tmp_path / "train", 0), folder(tmp_path / "val", 1)
    cfg = load_config("demo", ["model.depth=2", "eval.image_size=96", f"data.eval_train_source={train}",
                               f"data.eval_source={val}"])
    torch.manual_seed(0)
    _, teacher = build_student_teacher(cfg)
    backbone = teacher.backbone.eval()
    model = LoadedModel(backbone=backbone, cfg=cfg, kind="checkpoint", description="teacher",
                        random_init=lambda: backbone)
    offline = evaluate(model, str(train), str(val), device="cpu", linear=False)
    online = KNNEvaluator(cfg)
    assert online.evaluate(backbone) == {"knn_top1": offline["knn"]["top1"], "knn_top5": offline["knn"]["top5"]}
    pix = online.pixel_baseline()
    assert pix["view"] == offline["pixel_knn"]["view"] == "eval view 32x32x3"
    assert (pix["knn_top1"], pix["knn_top5"], pix["variant"]) == tuple(
        offline["pixel_knn"][k] for k in ("top1", "top5", "variant"))
