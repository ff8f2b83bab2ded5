"""Action recognition: frame-folder and (if PyAV is installed) video-file datasets, features, top-1."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from dense_helpers import frame_videos

from dinolab.eval import video as vid
from dinolab.eval.readers.video import read_frames, video_folders


def test_features_mean_and_concat(tmp_path, mixing_backbone) -> None:
    frame_videos(tmp_path, 1, 0)
    data = video_folders(tmp_path)
    common = dict(num_frames=3, resize_size=28, crop_size=28)
    concat, kept, failures = vid.video_features(
        mixing_backbone, data, vid.VideoConfig(temporal="concat", **common), num_workers=0, progress=False
    )
    mean, _, _ = vid.video_features(mixing_backbone, data, vid.VideoConfig(**common), num_workers=0, progress=False)
    assert concat.shape == (2, 3 * 192) and mean.shape == (2, 192) and kept.tolist() == [0, 1] and not failures
    np.testing.assert_allclose(mean, concat.reshape(2, 3, 192).mean(1), rtol=1e-5, atol=1e-6)
    frames = torch.stack([vid.make_eval_transform(28, 28)(f) for f in read_frames(data.videos[1], 3)])
    with torch.no_grad():
        np.testing.assert_allclose(concat[1], mixing_backbone(frames).reshape(-1).numpy(), rtol=1e-5, atol=1e-5)


def test_unreadable_video_is_reported(tmp_path, mixing_backbone) -> None:
    frame_videos(tmp_path, 1, 0)
    (tmp_path / "Left" / "v_Left_0" / "frame_0002.jpg").write_bytes(b"not a jpeg")
    data = video_folders(tmp_path)
    config = vid.VideoConfig(num_frames=6, resize_size=28, crop_size=28)
    _, kept, failures = vid.video_features(mixing_backbone, data, config, num_workers=0, progress=False)
    assert kept.tolist() == [1] and failures[0][0] == 0 and "frame_0002" in failures[0][1]


@pytest.mark.parametrize("classifier", ["logreg", "sgd"])
def test_linear_classifier_top1(tmp_path, mixing_backbone, classifier) -> None:
    frame_videos(tmp_path / "train", 4, 0)
    frame_videos(tmp_path / "val", 2, 1)
    train = video_folders(tmp_path / "train")
    val = video_folders(tmp_path / "val", classes=train.classes)
    config = vid.VideoConfig(num_frames=4, resize_size=28, crop_size=28, classifier=classifier, temporal="concat")
    results = vid.evaluate_video(mixing_backbone, train, val, config, num_workers=0, progress=False)
    assert results.num_train == 8 and results.num_val == 4
    assert results.top1 == 1.0  # the two classes differ in colour and motion: linearly separable


@pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV (av) is not installed")
def test_mp4_videos_decode_with_pyav(tmp_path) -> None:
    import av

    path = tmp_path / "Wave" / "clip.mp4"
    path.parent.mkdir()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * f, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = video_folders(tmp_path)
    frames = read_frames(data.videos[0], 5)  # centres of 5 segments of 10 frames: 1, 3, 5, 7, 9
    assert [round(float(np.asarray(f).mean()) / 20) for f in frames] == [1, 3, 5, 7, 9]


def test_missing_pyav_gives_install_hint(tmp_path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ImportError, match=r"dinolab\[video\]"):
        read_frames(tmp_path / "clip.mp4", 4)
