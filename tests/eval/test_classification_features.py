"""Feature extraction for the classification evals: what one pass yields, failures, the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import FakeData

import dinolab.eval.features as features_module
from dinolab.eval.features import ClassificationFeatureFn, ExtractionConfig, extract_labelled, model_fingerprint
from dinolab.eval.readers.classification import LabelledImages, load_labelled
from dinolab.models.vit import vit_tiny

CONFIG = ExtractionConfig(resize=28, crop=28, batch_size=16, num_workers=0, device="cpu", progress=False)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vit_tiny(depth=3, img_size=28).eval()


def test_one_pass_gives_last_blocks_cls_and_mean_patch_token() -> None:
    model = tiny_model()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = ClassificationFeatureFn(n_last_blocks=4)(model, images)
        # reference: run the blocks by hand and apply the final norm to each block's output
        tokens = model.prepare_tokens_with_masks(images)
        per_block = []
        for block in model.blocks:
            tokens = block(tokens)
            per_block.append(model.norm(tokens))
        final = model.forward_features(images)
    assert out["cls"].shape == (2, 3, 192)  # depth 3 < 4: every block
    for b in range(3):
        torch.testing.assert_close(out["cls"][:, b], per_block[b][:, 0])
    torch.testing.assert_close(out["cls"][:, -1], final["x_norm_clstoken"])
    torch.testing.assert_close(out["patch_mean"], final["x_norm_patchtokens"].mean(dim=1))


def test_corrupt_images_are_reported_and_cache_is_reused(digits_dirs, tmp_path: Path, monkeypatch) -> None:
    train_dir, _ = digits_dirs
    broken = train_dir / "3" / "broken.png"
    broken.write_bytes(b"not a png at all")
    try:
        data = load_labelled(train_dir)
        config = ExtractionConfig(**{**CONFIG.__dict__, "cache_dir": str(tmp_path / "cache")})
        model = tiny_model()
        first = extract_labelled(model, data, config)
        assert len(first) == len(data) - 1 and first.failures[0][0] == str(broken)
        good = [i for i, p in enumerate(data.paths) if p != broken]
        np.testing.assert_array_equal(first.labels, data.labels[good])
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

        def no_extraction(*args, **kwargs):
            raise AssertionError("features should come from the cache")

        monkeypatch.setattr(features_module, "extract_features", no_extraction)
        cached = extract_labelled(model, data, config)
        np.testing.assert_array_equal(cached.cls, first.cls)
        np.testing.assert_array_equal(cached.patch_mean, first.patch_mean)
        assert cached.failures == first.failures
        with pytest.raises(AssertionError, match="cache"):  # another model is another key
            extract_labelled(tiny_model(seed=1), data, config)
        with pytest.raises(AssertionError, match="cache"):  # so is another transform
            extract_labelled(model, data, ExtractionConfig(**{**config.__dict__, "crop": 14}))
    finally:
        broken.unlink()


def test_model_fingerprint_tracks_weights() -> None:
    model = tiny_model()
    before = model_fingerprint(model)
    assert model_fingerprint(tiny_model()) == before
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias[0] += 1e-3
    assert model_fingerprint(model) != before


def test_torchvision_backed_sets_extract() -> None:
    fake = FakeData(size=6, image_size=(3, 20, 20), num_classes=3, random_offset=0)
    labels = np.array([int(fake[i][1]) for i in range(6)])
    data = LabelledImages(name="fake", labels=labels, classes=["a", "b", "c"], torchvision_dataset=fake)
    subset = data.subset(np.array([1, 4]))
    features = extract_labelled(tiny_model(), subset, CONFIG)
    assert features.cls.shape == (2, 3, 192) and features.labels.tolist() == labels[[1, 4]].tolist()
