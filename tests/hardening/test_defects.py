"""One test per defect class of issue 15 (each failed before the fix): hostile files, stale results, concurrent
runs, image modes, symbolic links, file names, arguments, error presentation."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hardening_helpers import ROOT, tiny_config, write_images
from PIL import Image

from dinolab.cli.main import main
from dinolab.config import ConfigError
from dinolab.data.images import format_path_line, list_images, load_rgb, parse_path_line, read_path_list
from dinolab.eval.features import ExtractionConfig, extract_labelled
from dinolab.eval.readers.classification import LabelledImages
from dinolab.eval.readers.segmentation import SegmentationSet
from dinolab.hub import load_backbone
from dinolab.runtime import RunLock, RunLockedError
from dinolab.train import checkpoint as ckpt
from dinolab.train.config import TrainConfig
from dinolab.train.loop import check_resumable, export_run, train
from dinolab.train.meta_arch import SSLMetaArch


class RunsCode:
    """Pickles as a call to ``exec`` that creates ``marker``: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def embed(*args: str | Path) -> int:
    return main(
        ["embed", "--model", *map(str, args), "--resize", "64", "--crop", "56", "--num-workers", "0", "--no-progress"]
    )


# ------------------------------------------------------------------------------------- 1. code execution from files
def test_hostile_dcp_metadata_is_refused_by_export_and_resume(finished_run, noise_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "marker"
    (ckpt.latest_checkpoint(run) / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"\.metadata"):
        export_run(run, tmp_path / "out.pth")
    with pytest.raises(ckpt.UnsafeCheckpointError):
        train(tiny_config(noise_images, run))
    assert main(["export", "--model", str(run), "--output", str(tmp_path / "o.pth")]) == 2
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_hostile_object_inside_real_metadata_is_refused(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "marker"
    metadata_file = ckpt.latest_checkpoint(run) / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own file: trusted here
    metadata.planner_data = {"extra": RunsCode(marker)}
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"builtins\.exec"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(run), torch.nn.Linear(2, 2), optimizer=None)
    assert not marker.exists()


def test_hostile_value_in_checkpoint_shards_is_refused(tmp_path):
    """DCP stores non-tensor values (optimizer hyper-parameters) as pickles inside the .distcp shards."""
    marker = tmp_path / "marker"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    optimizer.param_groups[0]["note"] = RunsCode(marker)
    path = ckpt.save_checkpoint(tmp_path / "run", 1, model, optimizer, {"config": {}})
    assert not marker.exists()
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"note.*not plain data.*GLOBAL exec"):
        ckpt.load_checkpoint(path, model, optimizer)
    assert not marker.exists()


def test_checkpoints_dinolab_writes_still_load(finished_run):
    config = TrainConfig.load(finished_run / "config.json")
    model = SSLMetaArch.from_config(config)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(finished_run), model, optimizer=None)["step"] == 6


# ----------------------------------------------------------------------------------------- 2. stale feature cache
def test_feature_cache_follows_file_contents_and_says_when_reused(tiny_checkpoint, tmp_path, caplog):
    model = load_backbone(tiny_checkpoint)
    paths = write_images(tmp_path / "images", 6, seed=1)
    data = LabelledImages(name="set", labels=np.array([0, 1] * 3), classes=["a", "b"], paths=paths)
    config = ExtractionConfig(resize=64, crop=56, batch_size=3, num_workers=0, cache_dir=str(tmp_path / "c"))
    config = ExtractionConfig(**{**config.__dict__, "progress": False})
    first = extract_labelled(model, data, config, model_id="m")
    with caplog.at_level("WARNING"):
        again = extract_labelled(model, data, config, model_id="m")
    assert "reusing features cached" in caplog.text and "--no-cache" in caplog.text
    np.testing.assert_array_equal(again.cls, first.cls)

    time.sleep(0.01)
    write_images(tmp_path / "images", 6, seed=2)  # the same names, other pictures
    caplog.clear()
    with caplog.at_level("WARNING"):
        changed = extract_labelled(model, data, config, model_id="m")
    fresh = extract_labelled(model, data, config, model_id="m", use_cache=False)
    assert "reusing" not in caplog.text
    np.testing.assert_array_equal(changed.cls, fresh.cls)
    assert not np.allclose(changed.cls, first.cls)


# --------------------------------------------------------------------------------------------- 3. output folders
def test_embed_replaces_an_earlier_output_whole(noise_images, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert embed(tiny_checkpoint, noise_images, "-o", out, "--patch-pooled") == 0
    assert (out / "patch_pooled.npy").is_file()
    other = write_images(tmp_path / "other", 3, seed=5)
    assert embed(tiny_checkpoint, tmp_path / "other", "-o", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cls.npy", "failed.txt", "paths.txt", "summary.json"]
    assert np.load(out / "cls.npy").shape[0] == len(other) == len(read_path_list(out / "paths.txt"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(tiny_checkpoint) and summary["inputs"] == [str(tmp_path / "other")]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_embed_checks_the_output_before_any_work(noise_images, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import dinolab.cli.embed as cli_embed

    def no_work(*args, **kwargs):
        raise AssertionError("the embedding ran although --output is unusable")

    monkeypatch.setattr(cli_embed, "embed_images", no_work)
    as_file = tmp_path / "file.npy"
    as_file.write_text("x")
    assert embed(tiny_checkpoint, noise_images, "-o", as_file) == 2
    assert "is a file" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert embed(tiny_checkpoint, noise_images, "-o", foreign) == 2
    assert "thesis.tex" in capsys.readouterr().err and (foreign / "thesis.tex").read_text() == "keep me"


# --------------------------------------------------------------------------------------------- 4. concurrent runs
def test_second_writer_of_a_run_directory_is_refused_until_the_first_dies(noise_images, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from dinolab.runtime import RunLock; RunLock({str(run)!r}).acquire(); print('held', flush=True); import time; time.sleep(120)",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            train(tiny_config(noise_images, run, "optim.epochs=1", "optim.iters_per_epoch=1"))
        assert not (run / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder releases the lock
        holder.wait()
    assert train(tiny_config(noise_images, run, "optim.epochs=1", "optim.iters_per_epoch=1")).finished


def test_run_lock_is_exclusive_within_one_process(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunLockedError, match="in use"):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


# -------------------------------------------------------------------------------------------------- 5. image modes
def _saved(tmp_path: Path, image: Image.Image, name: str) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def _gradient(dtype, high: float, shape=(16, 20)) -> np.ndarray:
    return (np.linspace(0, high, shape[0] * shape[1]).reshape(shape)).astype(dtype)


@pytest.mark.parametrize(
    "name, make, reference",
    [
        ("i16.png", lambda: Image.fromarray(_gradient(np.uint16, 65535)), lambda a: a / 65535 * 255),
        ("i16.tif", lambda: Image.fromarray(_gradient(np.uint16, 40000)), lambda a: a / 65535 * 255),
        ("f01.tif", lambda: Image.fromarray(_gradient(np.float32, 1.0)), lambda a: a * 255),
        ("fwide.tif", lambda: Image.fromarray(_gradient(np.float32, 5000.0) - 1000), lambda a: (a + 1000) / 5000 * 255),
        ("i32.tif", lambda: Image.fromarray(_gradient(np.int32, 65535)), lambda a: a / 65535 * 255),
        ("l.png", lambda: Image.fromarray(_gradient(np.uint8, 255)), lambda a: a),
    ],
)
def test_wide_and_grey_modes_are_scaled_not_clipped(tmp_path, name, make, reference):
    path = _saved(tmp_path, make(), name)
    with Image.open(path) as opened:
        stored = np.asarray(opened).astype(np.float64)
    rgb = np.asarray(load_rgb(path)).astype(np.float64)  # [H, W, 3]
    expected = np.clip(np.rint(reference(stored)), 0, 255)
    assert rgb.shape == (*stored.shape, 3)
    for channel in range(3):
        np.testing.assert_allclose(rgb[..., channel], expected, atol=1)
    assert 100 < rgb.mean() < 160 or name == "i16.tif"  # mid-grey on average, not all white


def test_colour_modes_match_a_numpy_reference(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    np.testing.assert_array_equal(np.asarray(load_rgb(_saved(tmp_path, rgba, "a.png"))), rgb)
    grey_alpha = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    np.testing.assert_array_equal(np.asarray(load_rgb(_saved(tmp_path, grey_alpha, "la.png")))[..., 1], rgb[..., 0])
    palette = Image.fromarray(rgb).quantize(16)
    table = np.array(palette.getpalette()[: 16 * 3], dtype=np.uint8).reshape(-1, 3)
    expected = table[np.asarray(palette)]
    np.testing.assert_array_equal(np.asarray(load_rgb(_saved(tmp_path, palette, "p.png"))), expected)
    bilevel = Image.fromarray(rgb[..., 0] > 127)
    assert set(np.unique(np.asarray(load_rgb(_saved(tmp_path, bilevel, "one.png"))))) <= {0, 255}


def test_premultiplied_alpha_is_undone():
    image = Image.new("La", (2, 2), (100, 128))
    assert np.asarray(load_rgb_image(image))[0, 0, 0] == 199  # 100 * 255 / 128


def load_rgb_image(image: Image.Image) -> Image.Image:
    from dinolab.data.images import to_rgb

    return to_rgb(image)


# ---------------------------------------------------------------------------------------- 6. links and unreadables
def test_symlinked_folders_are_followed_and_problems_listed(tiny_checkpoint, tmp_path):
    photos = write_images(tmp_path / "elsewhere" / "photos", 4, seed=3)
    root = tmp_path / "data"
    write_images(root, 1, seed=4)
    (root / "linked").symlink_to(tmp_path / "elsewhere" / "photos", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    found = list_images(root)
    assert [p.name for p in found if p.parent.name == "linked"] == [p.name for p in photos]
    assert len(found) == 5
    out = tmp_path / "out"
    assert embed(tiny_checkpoint, root, "-o", out) == 0
    assert len(read_path_list(out / "paths.txt")) == 5
    failed = (out / "failed.txt").read_text()
    assert "loop" in failed and "gone.png" in failed and "dangling" in failed


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_folder_is_listed(tiny_checkpoint, tmp_path):
    root = tmp_path / "data"
    write_images(root, 1)
    write_images(root / "locked", 2)
    (root / "locked").chmod(0)
    try:
        out = tmp_path / "out"
        assert embed(tiny_checkpoint, root, "-o", out) == 0
        assert "locked" in (out / "failed.txt").read_text()
    finally:
        (root / "locked").chmod(0o755)


# ------------------------------------------------------------------------------------------------- 7. file names
def test_any_file_name_round_trips_through_embed(tiny_checkpoint, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    raw = os.fsdecode(b"caf\xe9-latin1.png")  # not UTF-8
    names = [raw, "two\nlines.png", "tab\there.png", '"quoted".png', "#hash.png", " space.png", "ok.png"]
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(folder / name, format="PNG")
    out = tmp_path / "out"
    assert embed(tiny_checkpoint, folder, "-o", out, "--patch-pooled") == 0
    listed = read_path_list(out / "paths.txt")
    assert sorted(listed) == sorted(folder / n for n in names)
    assert len(listed) == len(np.load(out / "cls.npy")) == len(np.load(out / "patch_pooled.npy"))
    model = load_backbone(tiny_checkpoint)
    from dinolab.data.transforms import make_eval_transform

    row = listed.index(folder / "two\nlines.png")
    with torch.no_grad():
        expected = model.forward_features(make_eval_transform(64, 56)(load_rgb(listed[row]))[None])
    np.testing.assert_allclose(np.load(out / "cls.npy")[row], expected["x_norm_clstoken"][0].numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["plain/a.png", "a\nb", "x\ty", '"q"', "#c", " lead", "\u2028sep", "caf\udce9"])
def test_path_lines_round_trip(name):
    line = format_path_line(name)
    assert "\n" not in line and "\t" not in line and len(line.splitlines()) == 1
    assert parse_path_line(line) == name


# -------------------------------------------------------------------------------------------------- 8. arguments
def test_data_paths_keep_their_commas(tmp_path):
    from dinolab.cli.train import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--recipe", "test_tiny", "--data", "a,b", "--data", "c", "--output", str(tmp_path)])
    assert resolve_config(args).run.data == ["a,b", "c"]


def test_refused_resume_leaves_config_json_alone(finished_run, noise_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"heads\.dino_prototypes"):
        train(tiny_config(noise_images, run, "heads.dino_prototypes=32"))
    assert (run / "config.json").read_bytes() == before


def test_changed_global_crop_size_is_refused_by_the_resume_check(finished_run, noise_images, tmp_path):
    meta = ckpt.read_meta(ckpt.latest_checkpoint(finished_run))
    changed = tiny_config(noise_images, tmp_path, f"crops.global_size={meta['config']['crops']['global_size'] + 14}")
    with pytest.raises(ConfigError, match="global_size"):
        check_resumable(changed, meta, ckpt.latest_checkpoint(finished_run))


# -------------------------------------------------------------------------------------------- 10. error presentation
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_user_errors_print_one_line_without_traceback(noise_images, tiny_checkpoint, tmp_path, capsys):
    cases = [
        (["embed", "--model", str(tiny_checkpoint), str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")], "nowhere"),
        (["train", "--recipe", "no_such_recipe", "--data", str(noise_images)], "no_such_recipe"),
        (["train", "--config", str(tmp_path / "missing.json"), "--data", str(noise_images)], "missing.json"),
        (["export", "--model", str(tmp_path / "no_run"), "--output", str(tmp_path / "x.pth")], "no_run"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases.append((["train", "--config", str(bad_json), "--data", str(noise_images), "--output", str(tmp_path)], ""))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    cases.append(
        (["embed", "--model", str(corrupt), str(noise_images), "-o", str(tmp_path / "o2")], "corrupt.safetensors")
    )
    if not torch.cuda.is_available():
        out = str(tmp_path / "cuda_run")
        cases.append(
            (
                ["train", "--recipe", "test_tiny", "--data", str(noise_images), "--output", out, "run.device=cuda"],
                "run.device=cpu",
            )
        )
    for argv, named in cases:
        assert main(argv) != 0, argv
        assert named in _one_line_error(capsys), argv


def test_internal_errors_are_one_line_unless_debugging(monkeypatch, capsys, tmp_path):
    import dinolab.cli.export as cli_export

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli_export, "run", broken)
    assert main(["export", "--model", str(tmp_path), "--output", "x.pth"]) == 1
    assert "--debug" in _one_line_error(capsys)
    assert main(["--debug", "export", "--model", str(tmp_path), "--output", "x.pth"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_mask_values_beyond_the_classes_name_the_file(tmp_path):
    image, mask = tmp_path / "i.png", tmp_path / "m.png"
    Image.new("RGB", (8, 8)).save(image)
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(mask)
    data = SegmentationSet("s", [image], [mask], 5, tuple("abcde"))
    with pytest.raises(ValueError, match=r"m\.png.*--num-classes"):
        data.read_mask(0)


def test_metrics_and_skipped_files_have_no_duplicate_lines_after_a_resume(noise_images, tmp_path):
    assert train(tiny_config(noise_images, tmp_path, "run.stop_after_iters=3")).steps_done == 3
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000003")  # as if killed after logging 3, before its checkpoint
    assert train(tiny_config(noise_images, tmp_path)).finished
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    skipped = (tmp_path / "skipped_images.txt").read_text().splitlines()
    assert skipped and len(skipped) == len(set(skipped))


def test_curate_run_checks_decontamination_dimensions_before_embedding(tmp_path, monkeypatch):
    from dinolab.curation import pipeline
    from dinolab.curation.store import write_store

    write_store(tmp_path / "eval", np.eye(3, 8, dtype=np.float32), ["a", "b", "c"])
    config = pipeline.PipelineConfig(
        pool=pipeline.StoreSpec(store=tmp_path / "pool", model="pixels:3", inputs=(str(tmp_path),)),
        output=tmp_path / "out",
        decontaminate=pipeline.DecontaminateStage(eval=(pipeline.StoreSpec(store=tmp_path / "eval"),)),
    )

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking dimensions")

    monkeypatch.setattr(pipeline, "embed_to_store", no_embedding)
    with pytest.raises(ValueError, match=r"9-dimensional.*eval \(8\)"):
        pipeline.run_pipeline(config)
