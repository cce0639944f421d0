"""Weighted k-NN classifier, evaluation transform and feature extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ibot_ray.knn import IMAGENET_MEAN, IMAGENET_STD, eval_transform, extract_features, knn_classify


def naive_knn(train, train_y, test, test_y, k, T, num_classes):
    """Independent float64 reference: one test sample at a time, explicit sort and vote."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    top1 = top5 = 0
    for q, y in zip(test, test_y):
        q = q / np.linalg.norm(q)
        sims = train @ q
        order = np.argsort(-sims, kind="stable")[: min(k, len(train))]
        scores = {}
        for j in order:
            scores[int(train_y[j])] = scores.get(int(train_y[j]), 0.0) + math.exp(sims[j] / T)
        ranked = sorted(scores, key=lambda c: (-scores[c], c))
        top1 += ranked[0] == y
        top5 += y in ranked[: min(5, num_classes)]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def test_clustered_points_on_the_sphere_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centers = nn.functional.normalize(torch.randn(10, 32, generator=g), dim=1)
    train_y = torch.arange(10).repeat_interleave(40)
    test_y = torch.arange(10).repeat(15)
    train = centers[train_y] + 0.05 * torch.randn(len(train_y), 32, generator=g)
    test = (centers[test_y] + 0.05 * torch.randn(len(test_y), 32, generator=g)) * 7.0  # scale must not matter
    assert knn_classify(train, train_y, test, test_y) == {"top1": 100.0, "top5": 100.0}
    # shuffled labels: chance level, far from 100
    wrong = knn_classify(train, train_y, test, (test_y + 1) % 10, k=20)
    assert wrong["top1"] == 0.0 and wrong["top5"] < 100.0


def test_weighted_vote_differs_from_majority_vote():
    # test point at angle 0; one class-0 neighbour at 10 degrees, two class-1 neighbours at +-80 degrees.
    angles = np.deg2rad([10.0, 80.0, -80.0])
    train = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    train_y = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    s0, s1 = math.cos(math.radians(10)), math.cos(math.radians(80))
    for T in (0.07, 0.5, 2.0):
        w0, w1 = math.exp(s0 / T), 2 * math.exp(s1 / T)  # class scores by the formula
        expected_class = 0 if w0 > w1 else 1
        for label in (0, 1):
            out = knn_classify(train, train_y, test, torch.tensor([label]), k=3, temperature=T, num_classes=2)
            assert out["top1"] == (100.0 if label == expected_class else 0.0), (T, label)
            assert out["top5"] == 100.0  # min(5, num_classes) = 2 classes, both have neighbours
    # T = 0.07 -> exp(14.07) vs 2 exp(2.48): weighted picks 0; T = 2 -> 1.64 vs 2.09: majority class 1 wins
    assert math.exp(s0 / 0.07) > 2 * math.exp(s1 / 0.07) and math.exp(s0 / 2) < 2 * math.exp(s1 / 2)
    # k = 1 only sees the closest point
    assert knn_classify(train, train_y, test, torch.tensor([0]), k=1, temperature=2.0)["top1"] == 100.0


def test_matches_naive_reference_and_is_chunk_invariant():
    rng = np.random.default_rng(1)
    num_classes = 7
    train = rng.normal(size=(300, 16)).astype(np.float32)
    train_y = rng.integers(0, num_classes, 300)
    train[:, :num_classes] += 1.5 * np.eye(num_classes, dtype=np.float32)[train_y]  # some class structure
    test_y = rng.integers(0, num_classes, 123)
    test = rng.normal(size=(123, 16)).astype(np.float32)
    test[:, :num_classes] += 1.5 * np.eye(num_classes, dtype=np.float32)[test_y]
    for k, T in ((1, 0.07), (5, 0.07), (20, 0.1), (300, 0.5)):
        ref = naive_knn(train, train_y, test, test_y, k, T, num_classes)
        outs = [knn_classify(torch.from_numpy(train), torch.from_numpy(train_y), torch.from_numpy(test),
                             torch.from_numpy(test_y), k=k, temperature=T, num_classes=num_classes, chunk_size=c)
                for c in (1, 10, 4096)]
        for out in outs:
            assert out == outs[0]
            assert out["top1"] == pytest.approx(ref[0]) and out["top5"] == pytest.approx(ref[1]), (k, T)
        assert 20.0 < outs[0]["top1"] < 100.0  # a non-trivial problem


def test_k_larger_than_train_set_and_tiny_temperature():
    rng = np.random.default_rng(2)
    train, train_y = torch.from_numpy(rng.normal(size=(12, 8))).float(), torch.from_numpy(rng.integers(0, 3, 12))
    test, test_y = torch.from_numpy(rng.normal(size=(30, 8))).float(), torch.from_numpy(rng.integers(0, 3, 30))
    full = knn_classify(train, train_y, test, test_y, k=12)
    assert knn_classify(train, train_y, test, test_y, k=1000) == full
    assert full == dict(zip(("top1", "top5"), naive_knn(train, train_y, test, test_y, 12, 0.07, 3)))
    # T = 0.005: exp(s / T) reaches exp(200), beyond float32 (fine in the float64 reference)
    tiny = knn_classify(train, train_y, test, test_y, k=5, temperature=0.005)
    assert tiny == dict(zip(("top1", "top5"), naive_knn(train, train_y, test, test_y, 5, 0.005, 3)))


def test_top5_ignores_classes_without_neighbours():
    # 10 classes, k = 1: only the nearest neighbour's class can be predicted, even in top-5
    train = torch.eye(10)
    train_y = torch.arange(10)
    test = torch.eye(10) + 0.01
    test_y = (torch.arange(10) + 1) % 10
    assert knn_classify(train, train_y, test, test_y, k=1) == {"top1": 0.0, "top5": 0.0}
    assert knn_classify(train, train_y, test, torch.arange(10), k=1) == {"top1": 100.0, "top5": 100.0}


def test_invalid_inputs():
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="equal D"):
        knn_classify(x, y, torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError, match="labels"):
        knn_classify(x, y[:4], x, y)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_classify(x, y + 3, x, y, num_classes=2)
    with pytest.raises(ValueError, match="k must"):
        knn_classify(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, y, temperature=0.0)


# ---- eval transform -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (64, 64), (20, 37), (60, 71)])
def test_eval_transform_matches_torchvision_resize_centercrop(shape):
    from torchvision import transforms

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    size = 56
    out = eval_transform(img, size)
    assert out.shape == (3, size, size) and out.dtype == np.uint8
    tv = transforms.Compose([transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size)])  # 64 = round(56 / 0.875)
    expected = np.asarray(tv(Image.fromarray(img))).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, expected)


def test_eval_transform_centre_crop_position_and_grey_input():
    # an image already 256 on the short side is only cropped: the crop starts at (16, 16 + 32)
    img = np.arange(256 * 320 * 3, dtype=np.int64).reshape(256, 320, 3) % 251
    out = eval_transform(img.astype(np.uint8), 224)
    np.testing.assert_array_equal(out, img[16:240, 48:272].transpose(2, 0, 1).astype(np.uint8))
    grey = np.full((40, 40), 77, dtype=np.uint8)
    assert (eval_transform(grey, 32) == 77).all()
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(np.zeros((8, 8, 3), dtype=np.float32), 8)


# ---- feature extraction ---------------------------------------------------------------------------------------------


class TokenBackbone(nn.Module):
    """Stand-in for MaskedViT: a timm ViT whose forward returns the final-normed tokens (B, 1+N, D)."""

    def __init__(self):
        super().__init__()
        import timm

        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                     dynamic_img_size=True, drop_path_rate=0.5, depth=2)
        self.mask_token = nn.Parameter(torch.zeros(1, self.vit.embed_dim))

    def forward(self, x, mask=None):
        return self.vit.forward_features(x)


def test_extract_features_takes_normalised_cls_in_eval_mode():
    torch.manual_seed(0)
    backbone = TokenBackbone().train()
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    batches = [images[:3], images[3:5], images[5:]]
    feats = extract_features(backbone, batches)
    assert backbone.training  # mode restored
    assert feats.dtype == torch.float32 and feats.shape == (7, 192) and feats.device.type == "cpu"
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    backbone.eval()
    with torch.no_grad():
        expected = backbone.vit.forward_features((images.float() / 255 - mean) / std)[:, 0]
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    # deterministic (no drop path), batching-invariant
    torch.testing.assert_close(extract_features(backbone, [images]), feats, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(backbone, [images.float()])
