"""Checkpoint round trips (bit-exact), atomic writes and rejection of bad files."""

from __future__ import annotations

import copy
import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from ibot_ray.checkpoint import (
    FORMAT_KEY,
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    training_state,
)


class LossLike(nn.Module):
    """Stand-in for the iBOT loss: only EMA'd center buffers matter for checkpointing."""

    def __init__(self, dim: int = 3):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, dim))
        self.register_buffer("center2", torch.zeros(1, 1, dim))

    def update(self, t: torch.Tensor) -> None:
        self.center.mul_(0.9).add_(0.1 * t.mean(0, keepdim=True))
        self.center2.mul_(0.9).add_(0.1 * t.mean(0).view(1, 1, -1))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2,
                             weight_decay=0.04)


def train_step(student, teacher, optimizer, loss, x, y, momentum=0.9):
    optimizer.zero_grad()
    out = student(x)
    nn.functional.cross_entropy(out, y).backward()
    optimizer.step()
    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.mul_(momentum).add_((1 - momentum) * ps)
        loss.update(teacher(x))


def make_run(seed: int = 0, steps: int = 3):
    student = make_model(seed)
    teacher = copy.deepcopy(student)
    optimizer = make_optimizer(student)
    loss = LossLike()
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        train_step(student, teacher, optimizer, loss, x, y)
    return student, teacher, optimizer, loss


def assert_same(a, b, where="state"):
    """Recursive exact equality: tensors with torch.equal (and equal dtype), everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def draws():
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(2).tolist(), \
        torch.rand(3).tolist(), torch.randn(2).tolist()


def test_full_training_state_round_trip_is_bit_exact(tmp_path):
    student, teacher, optimizer, loss = make_run()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    config = {"model": {"arch": "vit_tiny_patch16_224", "patch_size": 8}, "crops": {"scale": (0.25, 1.0)}}
    extra = {"data_epoch": 2, "rows_seen": 12345, "per_rank": [torch.arange(3)], "note": "mid-epoch"}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in the python state
    np.random.randn(1)  # numpy's cached gaussian likewise

    state = training_state(student=student, teacher=teacher, optimizer=optimizer, loss=loss, scaler=scaler,
                           epoch=3, step=41, config=config, extra=extra)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, state)
    expected_draws = draws()
    saved = {name: copy.deepcopy(m.state_dict()) for name, m in
             [("student", student), ("teacher", teacher), ("loss", loss)]}
    saved_opt = copy.deepcopy(optimizer.state_dict())

    # fresh objects with different weights, empty optimizer state, default scaler
    student2, teacher2, loss2 = make_model(99), make_model(98), LossLike()
    optimizer2 = make_optimizer(student2)
    scaler2 = torch.amp.GradScaler("cpu")
    torch.manual_seed(1000)  # scramble the RNGs before restoring
    random.seed(1000)
    np.random.seed(1000)
    loaded = load_checkpoint(path)
    info = restore_training_state(loaded, student=student2, teacher=teacher2, optimizer=optimizer2, loss=loss2,
                                  scaler=scaler2)
    assert draws() == expected_draws
    assert info["epoch"] == 3 and info["step"] == 41
    assert info["config"] == {"model": {"arch": "vit_tiny_patch16_224", "patch_size": 8},
                              "crops": {"scale": [0.25, 1.0]}}
    assert_same(info["extra"], extra, "extra")
    assert_same(student2.state_dict(), saved["student"], "student")
    assert_same(teacher2.state_dict(), saved["teacher"], "teacher")
    assert_same(loss2.state_dict(), saved["loss"], "loss")
    assert loss2.center.abs().sum() > 0  # the centers really moved away from their zero init
    assert_same(optimizer2.state_dict(), saved_opt, "optimizer")
    assert len(saved_opt["state"]) == len(list(student.parameters()))
    assert scaler2.state_dict() == scaler.state_dict() and scaler2.get_scale() == 1024.0

    # continuing both runs with the same batch gives bit-identical weights: the optimizer moments carried over
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    train_step(student, teacher, optimizer, loss, x, y)
    train_step(student2, teacher2, optimizer2, loss2, x, y)
    assert_same(student2.state_dict(), student.state_dict(), "student after step")
    assert_same(teacher2.state_dict(), teacher.state_dict(), "teacher after step")
    assert_same(loss2.state_dict(), loss.state_dict(), "loss after step")


def test_ibot_config_survives_as_yaml(tmp_path):
    from ibot_ray.config import IBOTConfig, load_config

    cfg = load_config("demo")
    student, teacher, optimizer, loss = make_run(steps=1)
    state = training_state(student=student, teacher=teacher, optimizer=optimizer, loss=loss, epoch=0, step=0,
                           config=cfg)
    assert isinstance(state["config"], str)
    save_checkpoint(tmp_path / "c.pt", state)
    info = restore_training_state(load_checkpoint(tmp_path / "c.pt"), student=student, teacher=teacher,
                                  optimizer=optimizer, loss=loss, restore_rng=False)
    assert IBOTConfig.from_dict(info["config"]) == cfg


def test_wrapped_student_is_saved_without_module_prefix():
    student, teacher, optimizer, loss = make_run(steps=1)
    state = training_state(student=nn.DataParallel(student), teacher=teacher, optimizer=optimizer, loss=loss,
                           epoch=0, step=0, config={})
    assert list(state["student"]) == list(student.state_dict())
    assert not any(k.startswith("module.") for k in state["student"])
    # and it restores into a wrapped model as well
    target = make_model(7)
    restore_training_state(state, student=nn.DataParallel(target), teacher=make_model(8), optimizer=make_optimizer(
        target), loss=LossLike(), restore_rng=False)
    assert_same(target.state_dict(), student.state_dict())


def test_restore_is_strict():
    student, teacher, optimizer, loss = make_run(steps=1)
    state = training_state(student=student, teacher=teacher, optimizer=optimizer, loss=loss, epoch=0, step=0,
                           config={})
    other = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3), nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="student"):
        restore_training_state(state, student=other, teacher=make_model(1), optimizer=make_optimizer(other),
                               loss=LossLike(), restore_rng=False)
    with pytest.raises(CheckpointError, match="loss"):
        restore_training_state(state, student=make_model(1), teacher=make_model(1), optimizer=optimizer,
                               loss=LossLike(dim=5), restore_rng=False)
    with pytest.raises(CheckpointError, match="lacks"):
        restore_training_state({FORMAT_KEY: 1, "student": {}}, student=student, teacher=teacher,
                               optimizer=optimizer, loss=loss)


def test_rng_state_round_trips_through_a_file(tmp_path):
    random.gauss(0, 1)
    np.random.randn(1)
    state = rng_state()
    expected = draws()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    draws()  # advance everything
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


# ---- atomic writes --------------------------------------------------------------------------------------------------


class Exploding:
    def __reduce__(self):
        raise RuntimeError("cannot serialise me")


def _old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"tag": "old", "w": torch.arange(10.0)})
    return path, path.read_bytes()


def test_unsafe_state_is_rejected_before_writing(tmp_path):
    path, old_bytes = _old_checkpoint(tmp_path)
    for bad, where in [(Exploding(), "Exploding"), ({"arr": np.zeros(3)}, "ndarray"), (object(), "object")]:
        with pytest.raises(CheckpointError, match=where) as err:
            save_checkpoint(path, {"tag": "new", "extra": {"x": [1, bad]}})
        assert "state['extra']['x'][1]" in str(err.value)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    with pytest.raises(CheckpointError, match="ndarray"):
        training_state(student=make_model(0), teacher=make_model(0), optimizer=make_optimizer(make_model(0)),
                       loss=LossLike(), epoch=0, step=0, config={}, extra={"a": np.ones(2)})


def test_failure_during_serialisation_leaves_old_file_and_no_temp(tmp_path):
    deep: list = []
    for _ in range(20_000):  # passes the type check but overflows the pickler's recursion limit mid-write
        deep = [deep]
    bad_state = {"w": torch.randn(1000), "deep": deep}

    # a plain torch.save to the final path would have left a partial file behind
    direct = tmp_path / "direct" / "partial.pt"
    direct.parent.mkdir()
    with pytest.raises(RecursionError):
        torch.save(bad_state, direct)
    assert direct.exists()

    path, old_bytes = _old_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="RecursionError") as err:
        save_checkpoint(path, bad_state)
    assert str(path) in str(err.value)
    assert path.read_bytes() == old_bytes
    assert load_checkpoint(path)["tag"] == "old"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "direct"]


def test_save_replaces_existing_file(tmp_path):
    path, _ = _old_checkpoint(tmp_path)
    save_checkpoint(path, {"tag": "new"})
    assert load_checkpoint(path)["tag"] == "new"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


# ---- rejection of bad files -----------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.randn(1000)})
    data = good.read_bytes()
    for n in (len(data) // 2, len(data) - 10, 10):
        bad = tmp_path / f"trunc{n}.pt"
        bad.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=f"trunc{n}.pt"):
            load_checkpoint(bad)


def test_random_bytes_text_and_foreign_zip(tmp_path):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    txt = tmp_path / "notes.pt"
    txt.write_text("epoch: 3\nthis is not a checkpoint\n")
    zp = tmp_path / "archive.pt"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("hello.txt", "hi")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (rnd, txt, zp, empty):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)


def test_foreign_torch_files(tmp_path):
    plain = tmp_path / "plain_state_dict.pt"
    torch.save(make_model(0).state_dict(), plain)
    with pytest.raises(CheckpointError, match="not an ibot_ray checkpoint"):
        load_checkpoint(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor)
    with pytest.raises(CheckpointError, match="tensor.pt"):
        load_checkpoint(tensor)
    future = tmp_path / "future.pt"
    torch.save({FORMAT_KEY: 99}, future)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(future)


def test_pickle_with_custom_class_is_never_executed(tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(sentinel),)

    via_torch = tmp_path / "evil_torch.pt"
    torch.save({FORMAT_KEY: 1, "x": Payload()}, via_torch)
    via_pickle = tmp_path / "evil.pkl"
    via_pickle.write_bytes(pickle.dumps({FORMAT_KEY: 1, "x": Payload()}, protocol=2))
    for path in (via_torch, via_pickle):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)
    assert not sentinel.exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")



def test_each_rank_and_step_draw_their_own_stream_and_a_resumed_step_draws_the_same(tmp_path):
    """The Ray worker seeds every step from (train.seed, rank, step) (pipelines/train_worker.py): ranks with
    identical initial weights draw different drop-path masks, and a run resumed from a checkpoint, in a process
    whose RNGs are elsewhere, continues bit-identically to the uninterrupted run, with no RNG state restored."""
    from test_step import make_batch, make_images, tiny_cfg

    from ibot_ray.checkpoint import seed_stream
    from ibot_ray.model import build_student_teacher
    from ibot_ray.step import IBOTStep

    cfg = tiny_cfg("model.drop_path_rate=0.5", "optim.warmup_epochs=0", "optim.freeze_last_layer=0",
                   "head.out_dim=64", "head.patch_out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32")
    g = torch.Generator().manual_seed(3)
    images = make_images(4)
    batches = [make_batch(cfg, images, g) for _ in range(2)]

    def runner():
        torch.manual_seed(cfg.train.seed)  # as the worker: the same initial weights on every rank
        student, teacher = build_student_teacher(cfg)
        return IBOTStep(cfg, student, teacher, steps_per_epoch=10)

    def step(r, rank, batch):
        seed_stream(cfg.train.seed, rank, r.step)
        return r(batch)

    rank0, rank1 = runner(), runner()
    assert_same(rank0.student.state_dict(), rank1.student.state_dict(), "initial weights")
    m0, m1 = step(rank0, 0, batches[0]), step(rank1, 1, batches[0])
    assert m0["loss"] != m1["loss"]  # same weights, same images: only the ranks' drop-path draws differ
    seed_stream(cfg.train.seed, 1, 0)
    first = torch.rand(4)
    seed_stream(cfg.train.seed, 1, 0)
    assert torch.equal(torch.rand(4), first) and not torch.equal(torch.rand(4), first)

    r = rank0  # checkpointed after step 0, then runs on uninterrupted
    save_checkpoint(tmp_path / "state.pt", training_state(
        student=r.student, teacher=r.teacher, optimizer=r.optimizer, loss=r.loss, scaler=r.scaler, epoch=0,
        step=r.step, config=cfg))
    step(rank0, 0, batches[1])
    torch.manual_seed(1234)  # the restarted process's RNGs are anywhere
    resumed = runner()
    info = restore_training_state(load_checkpoint(tmp_path / "state.pt"), student=resumed.student,
                                  teacher=resumed.teacher, optimizer=resumed.optimizer, loss=resumed.loss,
                                  scaler=resumed.scaler, restore_rng=False)
    resumed.counters.step = info["step"]
    torch.rand(7)
    step(resumed, 0, batches[1])
    assert_same(resumed.student.state_dict(), rank0.student.state_dict(), "student after the resumed step")
    assert_same(resumed.teacher.state_dict(), rank0.teacher.state_dict(), "teacher after the resumed step")
    assert not hasattr(IBOTStep, "state")  # the checkpoint module is the one description of the resumable state
