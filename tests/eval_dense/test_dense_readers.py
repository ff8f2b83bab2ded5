"""Readers of the standard dataset layouts, on tiny datasets written to tmp."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from dense_helpers import write_gray, write_rgb
from PIL import Image

from dinolab.eval.readers import depth, retrieval, segmentation, video


def test_ade20k_layout_shifts_labels_by_one(tmp_path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    stored = np.array([[0, 1, 2], [150, 3, 0]], dtype=np.uint8)
    for split in ("training", "validation"):
        for name in ("ADE_a", "ADE_b"):
            write_rgb(base / "images" / split / f"{name}.jpg", np.zeros((2, 3, 3)))
            write_gray(base / "annotations" / split / f"{name}.png", stored)
    data = segmentation.ade20k(tmp_path, "validation")
    assert [p.name for p in data.images] == ["ADE_a.jpg", "ADE_b.jpg"]
    assert data.num_classes == 150 and len(data.class_names) == 150
    np.testing.assert_array_equal(data.read_mask(0), [[255, 0, 1], [149, 2, 255]])
    assert len(segmentation.ade20k(base, "train")) == 2  # the dataset folder itself also works


def test_voc_palette_masks_keep_their_indices(tmp_path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    ids = ["2007_000001", "2007_000002"]
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    indices = np.array([[0, 15, 255], [20, 1, 0]], dtype=np.uint8)
    for i in ids:
        write_rgb(base / "JPEGImages" / f"{i}.jpg", np.zeros((2, 3, 3)))
        mask = Image.fromarray(indices, mode="P")
        mask.putpalette([v for c in range(256) for v in (c, 255 - c, (7 * c) % 256)])
        (base / "SegmentationClass").mkdir(exist_ok=True)
        mask.save(base / "SegmentationClass" / f"{i}.png")
    data = segmentation.voc2012(tmp_path, "val")
    assert data.num_classes == 21 and data.class_names[15] == "person"
    np.testing.assert_array_equal(data.read_mask(1), indices)
    with pytest.raises(FileNotFoundError, match=r"train\.txt"):
        segmentation.voc2012(tmp_path, "train")


def test_cityscapes_label_ids_map_to_19_train_ids(tmp_path) -> None:
    name = "aachen_000000_000019"
    write_rgb(tmp_path / "leftImg8bit" / "val" / "aachen" / f"{name}_leftImg8bit.png", np.zeros((2, 4, 3)))
    ids = np.array([[7, 8, 26, 33], [0, 6, 24, 34]], dtype=np.uint8)
    write_gray(tmp_path / "gtFine" / "val" / "aachen" / f"{name}_gtFine_labelIds.png", ids)
    data = segmentation.cityscapes(tmp_path, "val")
    # road 0, sidewalk 1, car 13, bicycle 18; unlabeled, ground and out-of-range ids ignored; person 11
    np.testing.assert_array_equal(data.read_mask(0), [[0, 1, 13, 18], [255, 255, 11, 255]])
    assert data.class_names[13] == "car"


def test_folder_pair_and_missing_mask_error(tmp_path) -> None:
    write_rgb(tmp_path / "img" / "a" / "x.jpg", np.zeros((4, 4, 3)))
    write_gray(tmp_path / "msk" / "a" / "x.png", np.full((4, 4), 2))
    data = segmentation.folder_pair(tmp_path / "img", tmp_path / "msk", num_classes=3)
    assert data.read_mask(0).tolist() == [[2] * 4] * 4
    write_rgb(tmp_path / "img" / "y.png", np.zeros((4, 4, 3)))
    with pytest.raises(FileNotFoundError, match="mask file"):
        segmentation.folder_pair(tmp_path / "img", tmp_path / "msk", num_classes=3)


def test_rgb_mask_is_rejected_with_a_clear_message(tmp_path) -> None:
    write_rgb(tmp_path / "m.png", np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="single-channel"):
        segmentation.read_label(tmp_path / "m.png", segmentation.identity_lookup())


def test_nyu_folders_and_split_file(tmp_path) -> None:
    scene = tmp_path / "sync" / "kitchen_0001"
    millimetres = np.array([[0, 1000, 2500], [9999, 500, 1]], dtype=np.uint16)
    for k in range(2):
        write_rgb(scene / f"rgb_{k:05d}.jpg", np.zeros((2, 3, 3)))
        write_gray(scene / f"sync_depth_{k:05d}.png", millimetres, mode="I;16")
    data = depth.nyu(tmp_path / "sync")
    assert len(data) == 2 and data.eval_crop == "nyu_eigen" and data.max_depth == 10.0
    _, metres = data.read(1)
    np.testing.assert_allclose(metres, millimetres / 1000.0)
    split = tmp_path / "nyu_test.txt"
    split.write_text("/kitchen_0001/rgb_00001.jpg /kitchen_0001/sync_depth_00001.png 518.8579\n")
    listed = depth.nyu(tmp_path / "sync", split)
    assert [p.name for p in listed.images] == ["rgb_00001.jpg"]


def test_kitti_eigen_list_skips_missing_ground_truth_and_crops(tmp_path) -> None:
    drive = "2011_09_26_drive_0002_sync"
    image_rel = f"2011_09_26/{drive}/image_02/data/0000000069.png"
    depth_rel = f"{drive}/proj_depth/groundtruth/image_02/0000000069.png"
    height, width = 360, 1230
    write_rgb(tmp_path / "raw" / image_rel, np.zeros((height, width, 3)))
    stored = np.zeros((height, width), dtype=np.uint16)
    stored[-1, width // 2] = 256 * 20  # 20 m at the bottom centre
    write_gray(tmp_path / "annotated" / "val" / depth_rel, stored, mode="I;16")
    split = tmp_path / "eigen_test.txt"
    split.write_text(f"{image_rel} {depth_rel} 721.5377\n{image_rel} None 721.5377\n")
    data = depth.kitti(tmp_path / "raw", tmp_path / "annotated", split)
    assert len(data) == 1 and data.max_depth == 80.0
    image, metres = data.read(0)
    assert image.size == (1216, 352) and metres.shape == (352, 1216)
    assert metres[-1, width // 2 - (width - 1216) // 2] == pytest.approx(20.0)


def test_depth_folder_pair_png_and_npy(tmp_path) -> None:
    write_rgb(tmp_path / "img" / "a.jpg", np.zeros((2, 2, 3)))
    write_rgb(tmp_path / "img" / "b.jpg", np.zeros((2, 2, 3)))
    write_gray(tmp_path / "dep" / "a.png", np.array([[100, 0], [300, 65535]]), mode="I;16")
    np.save(tmp_path / "dep" / "b.npy", np.array([[1.5, np.inf], [-1.0, np.nan]], dtype=np.float32))
    data = depth.folder_pair(tmp_path / "img", tmp_path / "dep", depth_scale=100.0, max_depth=1000.0)
    np.testing.assert_allclose(data.read(0)[1], [[1.0, 0.0], [3.0, 655.35]])
    np.testing.assert_array_equal(data.read(1)[1], [[1.5, 0.0], [0.0, 0.0]])  # non-finite / negative = unknown


def _revisited_files(tmp_path, name="roxford5k") -> None:
    base = tmp_path / name
    for image in ("db0", "db1", "db2", "q0"):
        write_rgb(base / "jpg" / f"{image}.jpg", np.zeros((8, 8, 3)))
    gnd = [{"bbx": np.array([1.0, 2.0, 6.5, 7.0]), "easy": [0], "hard": np.array([2]), "junk": [1]}]
    cfg = {"imlist": ["db0", "db1", "db2"], "qimlist": ["q0"], "gnd": gnd}
    (base / f"gnd_{name}.pkl").write_bytes(pickle.dumps(cfg))


def test_revisited_ground_truth_is_read_safely(tmp_path) -> None:
    _revisited_files(tmp_path)
    data = retrieval.revisited(tmp_path, "roxford5k")
    assert [p.name for p in data.database] == ["db0.jpg", "db1.jpg", "db2.jpg"]
    assert data.boxes == [(1.0, 2.0, 6.5, 7.0)]
    truth = data.truth[0]
    assert truth.easy.tolist() == [0] and truth.hard.tolist() == [2] and truth.junk.tolist() == [1]


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo owned",))


def test_safe_unpickler_refuses_code(tmp_path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"gnd": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        retrieval.safe_load_pickle(path)


def test_folder_relevance_marks_the_query_itself_as_junk(tmp_path) -> None:
    for name in ("a", "b", "c"):
        write_rgb(tmp_path / "db" / f"{name}.jpg", np.zeros((4, 4, 3)))
    (tmp_path / "rel.tsv").write_text("a.jpg\tb.jpg\ta.jpg\n# comment\na.jpg\tc.jpg\n")
    data = retrieval.folder_relevance(tmp_path / "db", tmp_path / "db", tmp_path / "rel.tsv")
    assert len(data.queries) == 1 and data.protocols == ("all",)
    assert data.truth[0].easy.tolist() == [1, 2] and data.truth[0].junk.tolist() == [0]


def test_sample_indices_are_segment_centres() -> None:
    # 10 frames in 4 segments of 2.5 frames: centres 1.25, 3.75, 6.25, 8.75
    assert video.sample_indices(10, 4).tolist() == [1, 3, 6, 8]
    assert video.sample_indices(2, 4).tolist() == [0, 0, 1, 1]  # short videos repeat frames
    with pytest.raises(ValueError):
        video.sample_indices(0, 3)


def test_frame_folders_and_split_lists(tmp_path) -> None:
    for cls in ("Jump", "Run"):
        for vid in ("v1", "v2"):
            for f in range(5):
                write_rgb(tmp_path / cls / f"v_{cls}_{vid}" / f"frame_{f + 1:04d}.jpg", np.full((4, 4, 3), 50 * f))
    data = video.video_folders(tmp_path)
    assert data.classes == ("Jump", "Run") and data.labels.tolist() == [0, 0, 1, 1]
    frames = video.read_frames(data.videos[0], 2)  # 5 frames, 2 segments: frames 1 and 3
    assert [int(np.asarray(f)[0, 0, 0]) for f in frames] == pytest.approx([50, 150], abs=3)
    (tmp_path / "testlist01.txt").write_text("Run/v_Run_v2.avi\n")
    listed = video.video_folders(tmp_path, tmp_path / "testlist01.txt", classes=data.classes)
    assert listed.videos == [tmp_path / "Run" / "v_Run_v2"] and listed.labels.tolist() == [1]
