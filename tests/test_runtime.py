"""dinolab.runtime's run-time helpers shared by every command: precision, device, process group, JSON values."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dinolab import runtime


def test_dtype_names_and_autocast() -> None:
    assert runtime.check_dtype("bf16") == "bf16"
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'.*must be one of"):
        runtime.check_dtype("fp8")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with runtime.autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with runtime.autocast_context(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device(None) == runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.default_device() == torch.device("cpu")
    with pytest.raises(ValueError, match=r"run\.device=cuda but no CUDA device.*use run\.device=cpu"):
        runtime.resolve_device("cuda", option="run.device=")


def test_a_plain_process_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.world() == (0, 1) and runtime.world_size() == 1 and runtime.is_main_process()
    assert runtime.launch_env() == (0, 1, 0)
    assert not runtime.join_process_group("gloo")
    env = runtime.init_distributed("cpu")
    assert (env.rank, env.world_size, env.device, env.is_main, env.distributed) == (
        0,
        1,
        torch.device("cpu"),
        True,
        False,
    )


def test_several_ranks_without_a_rendezvous_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert not runtime.join_process_group("gloo", min_world_size=2)  # curation: each rank works alone
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR is not set"):
        runtime.init_distributed("cpu")  # training: a rank alone would silently train on its part only


@dataclass
class _Record:
    name: str
    where: Path
    scores: tuple[float, ...]


def test_json_values() -> None:
    value = {"record": _Record("a", Path("/x/y"), (1.0, math.nan)), 3: np.float32(0.5), "v": np.arange(3)}
    assert runtime.to_jsonable(value) == {
        "record": {"name": "a", "where": "/x/y", "scores": [1.0, None]},
        "3": 0.5,
        "v": [0, 1, 2],
    }
    text = json.dumps({"p": Path("/x"), "n": np.int64(4), "a": np.ones(2)}, default=runtime.json_default)
    assert json.loads(text) == {"p": "/x", "n": 4, "a": [1.0, 1.0]}
    with pytest.raises(TypeError, match="cannot write object to JSON"):
        json.dumps({"o": object()}, default=runtime.json_default)


def test_atomic_json_takes_paths_and_numpy(tmp_path: Path) -> None:
    path = runtime.atomic_write_json(tmp_path / "r.json", {"where": tmp_path, "top1": np.float64(0.25)})
    assert json.loads(path.read_text()) == {"where": str(tmp_path), "top1": 0.25}
