"""``dinolab curate``: end to end on real photos with planted copies, and every action on generated stores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from curation_synthetic import blobs, perturb, unit
from PIL import Image

from dinolab.cli.main import main
from dinolab.curation import write_store
from dinolab.curation.report import read_manifest

PHOTOS = [
    "astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "hubble_deep_field",
    "immunohistochemistry", "text", "brick", "grass", "gravel", "clock", "colorwheel",
]  # fmt: skip
COPIED = ["astronaut", "camera", "coffee", "chelsea", "rocket"]


def make_photos(root: Path) -> tuple[Path, Path]:
    """scikit-image's sample photos (<= 160 px) and, for five of them, a JPEG q60, a half-size and a 90% crop."""
    originals, copies = root / "originals", root / "copies"
    originals.mkdir(parents=True)
    copies.mkdir()
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.thumbnail((160, 160))
        image.save(originals / f"{name}.png")
        if name in COPIED:
            image.save(copies / f"{name}_jpeg60.jpg", quality=60)
            image.resize((image.width // 2, image.height // 2), Image.BICUBIC).save(copies / f"{name}_half.png")
            w, h = image.size
            left, top = round(w * 0.05), round(h * 0.05)
            image.crop((left, top, w - left, h - top)).save(copies / f"{name}_crop90.png")
    return originals, copies


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_end_to_end_finds_the_planted_copies_of_real_photos(tmp_path: Path, capsys) -> None:
    originals, copies = make_photos(tmp_path)
    store = tmp_path / "store"
    # the pixel thumbnail (6x6 grey, mean-centred) on a 48 px centre crop: copies score >= 0.9, others <= 0.7
    embed = ["curate", "embed", "--model", "pixels:6", "--inputs", str(originals), str(copies)]
    assert main([*embed, "--store", str(store), "--resize", "48", "--crop", "48", "--num-workers", "0"]) == 0
    out = tmp_path / "dedup"
    assert main(["curate", "dedup", "--store", str(store), "--threshold", "0.8", "--output", str(out)]) == 0

    selected = (out / "selected.txt").read_text().splitlines()
    assert sorted(Path(p).name for p in selected) == sorted(f"{n}.png" for n in PHOTOS)
    rows = read_csv(out / "manifest.csv")
    assert len(rows) == len(PHOTOS) + 3 * len(COPIED)
    for row in rows:
        is_copy = "/copies/" in row["path"]
        assert row["kept"] == str(not is_copy) and row["reason"] == ("duplicate" if is_copy else "kept")
        if is_copy:  # the kept twin is the photo it was made from
            assert Path(row["twin"]).name == Path(row["path"]).name.rsplit("_", 1)[0] + ".png"
            assert row["source"] == str(copies) and float(row["similarity"]) >= 0.8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["duplicates"] == 15 and summary["selected"] == 16 and summary["index"] == "flat"
    assert (out / "plots" / "dedup_similarity.png").is_file() and "dedup_similarity" in (out / "summary.md").read_text()


def test_pipeline_config_chains_embed_dedup_decontaminate_and_balance(tmp_path: Path) -> None:
    originals, copies = make_photos(tmp_path)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for name in ("moon", "clock"):  # evaluation images that also sit in the pool
        Image.open(originals / f"{name}.png").save(eval_dir / f"{name}_eval.jpg", quality=90)
    (originals / "broken.png").write_bytes(b"\x89PNG truncated")
    model = 'model = "pixels:6"\nresize = 48\ncrop = 48'
    config = tmp_path / "curate.toml"
    config.write_text(
        f"""
output = "{tmp_path / "out"}"
manifest_format = "parquet"
[embed]
num_workers = 0
shard_size = 8
[pool]
store = "{tmp_path / "pool"}"
inputs = ["{originals}", "{copies}"]
{model}
[dedup]
threshold = 0.8
[decontaminate]
threshold = 0.9
[[decontaminate.eval]]
store = "{tmp_path / "eval_store"}"
inputs = ["{eval_dir}"]
{model}
[select]
mode = "balance"
clusters = [6, 2]
target = 10
"""
    )
    assert main(["curate", "run", str(config)]) == 0
    out = tmp_path / "out"
    manifest = read_manifest(out / "manifest.parquet")
    reason = {Path(p).name: r for p, r in zip(manifest["path"], manifest["reason"])}
    assert reason["moon.png"] == reason["clock.png"] == "contaminated"
    assert reason["broken.png"] == "unreadable"
    assert manifest["source"][manifest["path"].index(str(originals / "broken.png"))] == str(originals)
    assert all(reason[f"{n}_jpeg60.jpg"] == "duplicate" for n in COPIED)
    assert sum(r == "sampled" for r in reason.values()) == 10
    selected = (out / "selected.txt").read_text().splitlines()
    assert sorted(Path(p).name for p in selected) == sorted(n for n, r in reason.items() if r == "sampled")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["duplicates"], summary["contaminated"], summary["unreadable"], summary["selected"]) == (
        15,
        2,
        1,
        10,
    )
    assert summary["config"]["select"]["clusters"] == [6, 2]
    assert {p.name for p in (out / "plots").iterdir()} == {
        "dedup_similarity.png",
        "eval_similarity.png",
        "cluster_sizes.png",
    }


@pytest.fixture
def generated_stores(tmp_path: Path) -> dict[str, Path]:
    sizes = [1000, 50, 50, 50, 50]  # concept 0 is 20x larger
    pool, concept = blobs(sizes, dim=24, spread=0.4, seed=0)
    seeds = perturb(pool[[int(np.nonzero(concept == c)[0][0]) for c in range(5)]], 0.05, np.random.default_rng(1))
    paths = [f"/pool/c{c}/{i:05d}.jpg" for i, c in enumerate(concept)]
    return {
        "pool": write_store(tmp_path / "pool", pool, paths, shard_size=300).root,
        "seeds": write_store(tmp_path / "seeds", seeds, [f"/seeds/{c}.jpg" for c in range(5)]).root,
    }


def test_retrieve_sample_mode_cli(generated_stores: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["curate", "retrieve", "--pool", str(generated_stores["pool"]), "--seeds", str(generated_stores["seeds"])]
    assert main([*args, "--mode", "sample", "--n", "4", "--output", str(out)]) == 0
    rows = read_csv(out / "manifest.csv")
    retrieved = [r for r in rows if r["reason"] == "retrieved"]
    assert len(retrieved) == 20 and len((out / "selected.txt").read_text().splitlines()) == 20
    for row in retrieved:  # each retrieved image names the seed of its own concept
        assert row["twin"] == f"/seeds/{row['path'].split('/')[2][1:]}.jpg"


def test_retrieve_cluster_mode_and_balance_cli_rebalance(generated_stores: dict[str, Path], tmp_path: Path) -> None:
    pool, seeds = str(generated_stores["pool"]), str(generated_stores["seeds"])
    out = tmp_path / "cluster"
    args = ["curate", "retrieve", "--pool", pool, "--seeds", seeds, "--mode", "cluster", "--clusters", "5"]
    assert main([*args, "--m", "40", "--output", str(out)]) == 0
    concepts = [p.split("/")[2] for p in (out / "selected.txt").read_text().splitlines()]
    assert {c: concepts.count(c) for c in set(concepts)} == {f"c{c}": 40 for c in range(5)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["largest_cluster_share_before"] > 0.8 and summary["largest_cluster_share_after"] < 0.3

    out = tmp_path / "balance"
    args = ["curate", "balance", "--store", pool, "--levels", "2", "--clusters", "20,5", "--target", "100"]
    assert main([*args, "--output", str(out), "--manifest-format", "csv"]) == 0
    concepts = [p.split("/")[2] for p in (out / "selected.txt").read_text().splitlines()]
    assert {c: concepts.count(c) for c in set(concepts)} == {f"c{c}": 20 for c in range(5)}


def test_decontaminate_cli_and_bad_stores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = unit(np.random.default_rng(2).standard_normal((400, 16)))
    eval_x = np.concatenate([perturb(x[:10], 0.05, np.random.default_rng(0)), unit(np.ones((1, 16)))])
    pool = write_store(tmp_path / "pool", x, [f"/p/{i}.jpg" for i in range(400)], shard_size=128).root
    evals = write_store(tmp_path / "eval", eval_x, [f"/e/{i}.jpg" for i in range(11)]).root
    out = tmp_path / "out"
    assert (
        main(["curate", "decontaminate", "--store", str(pool), "--eval-store", str(evals), "--output", str(out)]) == 0
    )
    rows = read_csv(out / "manifest.csv")
    dropped = {r["path"]: r["twin"] for r in rows if r["reason"] == "contaminated"}
    assert dropped == {f"/p/{i}.jpg": f"/e/{i}.jpg" for i in range(10)}
    assert main(["curate", "dedup", "--store", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    assert "not an embedding store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "curate",
                "balance",
                "--store",
                str(pool),
                "--levels",
                "3",
                "--clusters",
                "4,2",
                "--target",
                "5",
                "--output",
                str(out),
            ]
        )


def test_run_config_takes_key_value_overrides(tmp_path, capsys):
    """`curate run CONFIG key=value ...` uses the same override mechanism as `dinolab train`: the stores made by
    the first run are reused, an override changes the selection, and a bad key fails before anything runs."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = tmp_path / "curate.toml"
    config.write_text(
        f'output = "{tmp_path / "out"}"\n[embed]\nnum_workers = 0\n'
        f'[pool]\nstore = "{tmp_path / "pool"}"\ninputs = ["{images}"]\nmodel = "pixels:4"\nresize = 16\ncrop = 16\n'
        '[select]\nmode = "balance"\nclusters = [3]\ntarget = 6\n'
    )
    assert main(["curate", "run", str(config), "select.target=4", f"output={tmp_path / 'out4'}"]) == 0
    assert len((tmp_path / "out4" / "selected.txt").read_text().splitlines()) == 4
    assert json.loads((tmp_path / "out4" / "summary.json").read_text())["config"]["select"]["target"] == 4
    assert main(["curate", "run", str(config), "select.targte=4"]) != 0
    assert "select.targte" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
