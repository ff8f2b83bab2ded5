"""Fault injection for train, embed, curate embed and export: SIGKILL at several points, SIGTERM, SIGINT and a full
disk (an injected ``OSError(ENOSPC)``). Afterwards either the result is complete and correct, or the previous state
is intact and the message says why."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hardening_helpers import ROOT, run_python, write_images

from dinolab.cli.main import main
from dinolab.curation.store import EmbeddingStore
from dinolab.train import checkpoint as ckpt
from dinolab.train.config import TrainConfig
from dinolab.train.meta_arch import SSLMetaArch

KILL = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and ("partial" in p.name or "tmp" in p.name)]


def run_state(run_dir: Path) -> dict[str, torch.Tensor]:
    config = TrainConfig.load(run_dir / "config.json")
    model = SSLMetaArch.from_config(config)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), model, optimizer=None)
    return model.state_dict()


def train_argv(data: Path, out: Path, *overrides: str) -> list[str]:
    return ["train", "--recipe", "test_tiny", "--data", str(data), "--output", str(out), *overrides]


# ----------------------------------------------------------------------------------------------------------- train
@pytest.mark.parametrize("where", ["inside the DCP write", "before meta.json is in place"])
def test_train_killed_while_checkpointing_resumes_exactly(where, noise_images, finished_run, tmp_path):
    patch = {
        "inside the DCP write": "import dinolab.train.checkpoint as c; real = c.dcp.save\n"
        "def save(state, checkpoint_id):\n"
        "    real(state, checkpoint_id=checkpoint_id)\n"
        f"    if checkpoint_id.endswith('04'): {KILL}\n"
        "c.dcp.save = save\n",
        "before meta.json is in place": "import dinolab.train.checkpoint as c; real = c.atomic_write_text\n"
        "def write(path, text):\n"
        f"    if '04' in str(path): {KILL}\n"
        "    return real(path, text)\n"
        "c.atomic_write_text = write\n",
    }[where]
    argv = train_argv(noise_images, tmp_path)
    killed = run_python(patch + f"from dinolab.cli.main import main; main({argv!r})")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert main(argv) == 0
    expected, resumed = run_state(finished_run), run_state(tmp_path)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))  # the next save of step 4 replaced the leftover


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_signal_finishes_the_step_checkpoints_and_exits_cleanly(signum, noise_images, tmp_path):
    command = [sys.executable, "-m", "dinolab", *train_argv(noise_images, tmp_path)]
    command += [
        "optim.epochs=1",
        "optim.iters_per_epoch=200",
        "optim.warmup_epochs=0",
        "run.checkpoint_every=1000",
        "run.log_every=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in err and "stopped (resume by running the same command)" in out
    done = [int(json.loads(line)["step"]) for line in metrics.read_text().splitlines()]
    assert [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(tmp_path)] == [done[-1]]
    assert 2 <= done[-1] < 200 and done == list(range(1, done[-1] + 1))
    resumed = subprocess.run([*command, "run.stop_after_iters=1"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and f"after {done[-1] + 1} iterations" in resumed.stdout


def test_train_full_disk_while_checkpointing_keeps_the_previous_one(noise_images, tmp_path, monkeypatch, capsys):
    real = ckpt.dcp.save

    def save(state, checkpoint_id):
        if checkpoint_id.endswith("04"):
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
            disk_full()
        real(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ckpt.dcp, "save", save)
    assert main(train_argv(noise_images, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "disk is full" in err and "step_00000002" in err and "kept" in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]


def test_train_full_disk_in_dcp_itself_is_named(noise_images, tmp_path, monkeypatch, capsys):
    """The error raised inside DCP's writer threads arrives wrapped in a CheckpointException."""
    import torch.distributed.checkpoint.filesystem as filesystem

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", lambda *a, **k: disk_full())
    assert main(train_argv(noise_images, tmp_path)) == 2
    assert "disk is full" in capsys.readouterr().err
    assert ckpt.list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").iterdir())


# ----------------------------------------------------------------------------------------------------------- embed
def embed_argv(model: Path, images: Path, out: Path) -> list[str]:
    return [
        "embed",
        "--model",
        str(model),
        str(images),
        "-o",
        str(out),
        "--resize",
        "64",
        "--crop",
        "56",
        "--num-workers",
        "0",
    ]


@pytest.fixture
def earlier_output(noise_images, tiny_checkpoint, tmp_path) -> Path:
    out = tmp_path / "out"
    assert main([*embed_argv(tiny_checkpoint, noise_images, out), "--patch-pooled", "--no-progress"]) == 0
    return out


def test_embed_killed_while_writing_leaves_the_earlier_output(earlier_output, tiny_checkpoint, tmp_path):
    before = snapshot(earlier_output)
    other = tmp_path / "other"
    write_images(other, 3, seed=9)
    patch = f"import numpy as np; real = np.save\ndef save(*a, **k):\n    real(*a, **k); {KILL}\nnp.save = save\n"
    argv = embed_argv(tiny_checkpoint, other, earlier_output)
    assert run_python(patch + f"from dinolab.cli.main import main; main({argv!r})").returncode == -signal.SIGKILL
    assert snapshot(earlier_output) == before
    assert main(argv) == 0  # complete and correct afterwards; the killed run's temporary folder is gone
    assert len(np.load(earlier_output / "cls.npy")) == 3 and not (earlier_output / "patch_pooled.npy").exists()
    assert leftovers(tmp_path) == []


def test_embed_sigterm_leaves_the_earlier_output(earlier_output, tiny_checkpoint, tmp_path):
    before = snapshot(earlier_output)
    patch = (
        "import os, signal, dinolab.cli.embed as e; real = e.embed_images\n"
        "def work(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM); return real(*a, **k)\n"
        "e.embed_images = work\n"
    )
    write_images(tmp_path / "more", 2)
    argv = embed_argv(tiny_checkpoint, tmp_path / "more", earlier_output)
    done = run_python(patch + f"import sys; from dinolab.cli.main import main; sys.exit(main({argv!r}))")
    assert done.returncode == 130 and "SIGTERM" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(earlier_output) == before and leftovers(tmp_path) == []


def test_embed_full_disk_leaves_the_earlier_output(earlier_output, noise_images, tiny_checkpoint, monkeypatch, capsys):
    before = snapshot(earlier_output)
    real = np.save
    calls = []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            disk_full()
        real(*args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    argv = [*embed_argv(tiny_checkpoint, noise_images, earlier_output), "--patch-pooled", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and f"{earlier_output} is unchanged" in err
    assert snapshot(earlier_output) == before and leftovers(earlier_output.parent) == []


# --------------------------------------------------------------------------------------------------- curate embed
def curate_argv(images: Path, store: Path) -> list[str]:
    return ["curate", "embed", "--model", "pixels:4", "--inputs", str(images), "--store", str(store)]


def curate_options() -> list[str]:
    return ["--shard-size", "4", "--num-workers", "0", "--resize", "32", "--crop", "0"]


def test_curate_embed_killed_between_shards_resumes_to_the_same_store(noise_images, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*curate_argv(noise_images, whole), *curate_options()]) == 0
    patch = (
        "import dinolab.curation.store as s; real = s.EmbeddingStore.write_shard\n"
        "def write(self, shard, *a):\n"
        f"    if shard == 2: {KILL}\n"
        "    real(self, shard, *a)\n"
        "s.EmbeddingStore.write_shard = write\n"
    )
    argv = [*curate_argv(noise_images, resumed), *curate_options()]
    assert run_python(patch + f"from dinolab.cli.main import main; main({argv!r})").returncode == -signal.SIGKILL
    assert EmbeddingStore.open(resumed, require_complete=False).done_shards() == [0, 1]
    assert main(argv) == 0
    a, b = EmbeddingStore.open(whole), EmbeddingStore.open(resumed)
    assert a.paths() == b.paths() and a.failures() == b.failures()
    np.testing.assert_array_equal(a.vectors()[:], b.vectors()[:])


def test_curate_embed_full_disk_marks_nothing_done(noise_images, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    monkeypatch.setattr(np, "save", disk_full)
    assert main([*curate_argv(noise_images, store), *curate_options()]) == 2
    assert "disk is full" in capsys.readouterr().err
    assert EmbeddingStore.open(store, require_complete=False).done_shards() == []
    assert [p.name for p in (store / "shards").iterdir()] == []


# ---------------------------------------------------------------------------------------------------------- export
def test_export_killed_while_writing_leaves_no_partial_file(finished_run, tmp_path):
    target = tmp_path / "backbone.pth"
    target.write_bytes(b"earlier export")
    patch = (
        "import torch\n"
        "def save(obj, f, *a, **k):\n"
        "    if hasattr(f, 'write'): f.write(b'partial'); f.flush()\n"
        "    else: open(f, 'wb').write(b'partial')\n"
        f"    {KILL}\n"
        "torch.save = save\n"
    )
    argv = ["export", "--model", str(finished_run), "--output", str(target)]
    assert run_python(patch + f"from dinolab.cli.main import main; main({argv!r})").returncode == -signal.SIGKILL
    assert target.read_bytes() == b"earlier export"
    assert main(argv) == 0 and torch.load(target, weights_only=True)


def test_export_full_disk_says_so_and_removes_the_temporary_file(finished_run, tmp_path, monkeypatch, capsys):
    import dinolab.runtime

    target = tmp_path / "backbone.pth"
    target.write_bytes(b"earlier export")

    def short_write(obj, f, *args, **kwargs):  # what torch's zip writer says when the disk fills up
        if hasattr(f, "write"):
            f.write(b"x" * 598)
        else:
            Path(f).write_bytes(b"x" * 598)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(dinolab.runtime, "_free_bytes", lambda directory: 2**20)
    assert main(["export", "--model", str(finished_run), "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "unexpected pos" not in err and len(err.strip().splitlines()) == 1
    assert target.read_bytes() == b"earlier export" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
