"""Retrieval: the revisited protocol's AP / mP@k against independent references, descriptors, end to end."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from dense_helpers import write_rgb
from sklearn.metrics import average_precision_score

from dinolab.eval import retrieval as ret
from dinolab.eval.readers.retrieval import QueryTruth, folder_relevance, revisited


def reference_ap(ranked_relevance: list[str], num_positives: int) -> float:
    """The trapezoid AP of revisitop's compute_ap, written from its definition: walk the ranking with junk
    ("J") removed; at the j-th positive (0-based) found at rank r add the mean of the precision just before it
    (j / r, 1 at rank 0) and at it ((j + 1) / (r + 1)), times the recall step 1 / num_positives."""
    kept = [x for x in ranked_relevance if x != "J"]
    ap, found = 0.0, 0
    for rank, item in enumerate(kept):
        if item == "P":
            before = 1.0 if rank == 0 else found / rank
            after = (found + 1) / (rank + 1)
            ap += (before + after) / 2 / num_positives
            found += 1
    return ap


def reference_precision_at(ranked_relevance: list[str], k: int) -> float:
    """revisitop's mP@k for one query: k' = min(k, 1-based position of the last positive), #positives in top k' / k'."""
    kept = [x for x in ranked_relevance if x != "J"]
    last = max(i + 1 for i, x in enumerate(kept) if x == "P")
    cutoff = min(k, last)
    return sum(1 for x in kept[:cutoff] if x == "P") / cutoff


def test_compute_ap_hand_value() -> None:
    # positives at ranks 0, 2, 5 of 3: (1 + (1/2 + 2/3) / 2 + (2/5 + 1/2) / 2) / 3 = 122 / 180
    assert ret.compute_ap(np.array([0, 2, 5]), 3) == pytest.approx(122 / 180)
    assert ret.compute_ap(np.array([0, 2, 5]), 3) == pytest.approx(reference_ap(list("PNPNNP"), 3))
    # a positive never retrieved still counts in the recall step
    assert ret.compute_ap(np.array([1]), 2) == pytest.approx(reference_ap(list("NP"), 2))


def test_compute_ap_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        relevant = rng.random(30) < 0.3
        relevant[rng.integers(30)] = True
        ranks = np.flatnonzero(relevant)
        scores = -np.arange(30.0)  # the ranking: item i at rank i
        sk = average_precision_score(relevant, scores)  # mean precision at each positive = the "after" term
        before = np.mean([1.0 if r == 0 else j / r for j, r in enumerate(ranks)])
        assert ret.compute_ap(ranks, len(ranks)) == pytest.approx((sk + before) / 2)
    perfect = np.array([True] * 4 + [False] * 6)
    assert ret.compute_ap(np.arange(4), 4) == pytest.approx(average_precision_score(perfect, -np.arange(10.0))) == 1


def test_compute_map_removes_junk_and_skips_queries_without_positives() -> None:
    # database items 0..7; query 0 ranks [5, 3, 0, 7, 1, 2, 4, 6]; positives {0, 1, 6}, junk {5, 7}
    ranking = np.array([[5, 3, 0, 7, 1, 2, 4, 6], [0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    truth = [
        (np.array([0, 1, 6]), np.array([5, 7])),
        (np.array([], dtype=np.int64), np.array([1])),
        (np.array([2, 3]), np.array([], dtype=np.int64)),
    ]
    scores = ret.compute_map(ranking, truth, kappas=(1, 5, 10))
    labels_0 = ["J", "N", "P", "J", "P", "N", "N", "P"]
    labels_2 = ["N", "N", "N", "N", "P", "P", "N", "N"]
    assert scores.aps[0] == pytest.approx(reference_ap(labels_0, 3))
    assert np.isnan(scores.aps[1])
    assert scores.map == pytest.approx((reference_ap(labels_0, 3) + reference_ap(labels_2, 2)) / 2)
    for k in (1, 5, 10):
        expected = (reference_precision_at(labels_0, k) + reference_precision_at(labels_2, k)) / 2
        assert scores.mp_at_k[k] == pytest.approx(expected)
    with pytest.raises(ValueError, match="no query"):
        ret.compute_map(ranking[1:2], truth[1:2])


def test_protocol_groups() -> None:
    truth = QueryTruth(easy=np.array([1]), hard=np.array([2]), junk=np.array([3]))
    ok, junk = ret.protocol_truth(truth, "easy")
    assert ok.tolist() == [1] and sorted(junk.tolist()) == [2, 3]
    ok, junk = ret.protocol_truth(truth, "medium")
    assert sorted(ok.tolist()) == [1, 2] and junk.tolist() == [3]
    ok, junk = ret.protocol_truth(truth, "hard")
    assert ok.tolist() == [2] and sorted(junk.tolist()) == [1, 3]
    with pytest.raises(ValueError, match="protocol"):
        ret.protocol_truth(truth, "extreme")


def test_gem_and_multiscale_descriptors(tmp_path, tiny_backbone) -> None:
    tokens = torch.tensor([[[1.0, -2.0], [2.0, 4.0]]])  # [B=1, N=2, D=2]
    expected = torch.tensor([[((1 + 8) / 2) ** (1 / 3), ((1e-18 + 64) / 2) ** (1 / 3)]])
    torch.testing.assert_close(ret.gem(tokens, p=3.0), expected)
    rng = np.random.default_rng(0)
    write_rgb(tmp_path / "a.png", rng.integers(0, 255, (50, 70, 3)))
    config = ret.RetrievalConfig(image_size=56, scales=ret.MULTISCALE, pooling="gem")
    multi = ret.describe_images(tiny_backbone, [tmp_path / "a.png"], None, config, num_workers=0, progress=False)
    singles = [
        ret.describe_images(
            tiny_backbone, [tmp_path / "a.png"], None, ret.RetrievalConfig(image_size=56 * s, pooling="gem"),
            num_workers=0, progress=False,
        )[0]
        for s in ret.MULTISCALE
    ]  # fmt: skip
    mean = np.mean(singles, axis=0)
    np.testing.assert_allclose(multi[0], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(multi[0]) == pytest.approx(1.0)


def test_resize_for_patches() -> None:
    from PIL import Image

    resized = ret.resize_for_patches(Image.new("RGB", (100, 40)), 56, 14)
    assert resized.size == (56, 14)  # 56 x 22.4 -> 56 x 14 (sides rounded down to the patch grid)


def test_revisited_end_to_end_with_query_crops(tmp_path, mixing_backbone) -> None:
    rng = np.random.default_rng(0)
    base = tmp_path / "rparis6k"
    images = {f"db{i}": rng.integers(0, 255, (42, 56, 3)) for i in range(4)}
    # the query image holds db2 in its box (x 10..66, y 5..47) inside unrelated surroundings
    query = rng.integers(0, 255, (60, 80, 3))
    query[5:47, 10:66] = images["db2"]
    for name, array in {**images, "q0": query}.items():
        write_rgb(base / "jpg" / f"{name}.png", array)
        (base / "jpg" / f"{name}.png").rename(base / "jpg" / f"{name}.jpg")  # lossless pixels under the .jpg name
    gnd = [{"bbx": [10.0, 5.0, 66.0, 47.0], "easy": [2], "hard": [], "junk": [0]}]
    cfg = {"imlist": list(images), "qimlist": ["q0"], "gnd": gnd}
    (base / "gnd_rparis6k.pkl").write_bytes(pickle.dumps(cfg))
    data = revisited(tmp_path, "rparis6k")
    config = ret.RetrievalConfig(image_size=56)
    cropped = ret.describe_images(mixing_backbone, data.queries, data.boxes, config, num_workers=0, progress=False)
    target = ret.describe_images(mixing_backbone, data.database[2:3], None, config, num_workers=0, progress=False)
    np.testing.assert_allclose(cropped, target, atol=1e-5)  # the query is described by its box crop
    results = ret.evaluate_retrieval(mixing_backbone, data, config, num_workers=0, progress=False)
    assert results.protocols["medium"].map == pytest.approx(1.0)  # the crop is pixel-identical to db2
    assert results.protocols["medium"].mp_at_k[1] == 1.0
    assert results.protocols["easy"].map == pytest.approx(1.0)
    assert results.protocols["hard"] is None  # no hard positives: the protocol has no score
    assert results.to_dict()["hard"] is None and results.to_dict()["num_database"] == 4


def test_folder_relevance_end_to_end(tmp_path, mixing_backbone) -> None:
    rng = np.random.default_rng(1)
    for i in range(5):
        array = rng.integers(0, 255, (40, 40, 3))
        write_rgb(tmp_path / "db" / f"{i}.png", array)
        if i < 2:
            write_rgb(tmp_path / "q" / f"{i}.png", array)
    (tmp_path / "rel.tsv").write_text("0.png\t0.png\n1.png\t1.png\n")
    data = folder_relevance(tmp_path / "q", tmp_path / "db", tmp_path / "rel.tsv")
    results = ret.evaluate_retrieval(
        mixing_backbone, data, ret.RetrievalConfig(image_size=42), num_workers=0, progress=False
    )
    assert list(results.protocols) == ["all"] and results.protocols["all"].map == pytest.approx(1.0)
