"""Fetching released weights: cached once, fast and helpful failure offline. Network use is loopback only."""

from __future__ import annotations

import functools
import http.server
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import dinolab.hub as hub
from dinolab.hub import WeightsUnavailableError, download_weights

UNREACHABLE = "http://127.0.0.1:9/dinov2_vits14_pretrain.pth"  # the discard port: nothing listens on loopback


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("no network access expected here")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_unreachable_host_fails_fast_with_advice(hub_cache: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        download_weights(UNREACHABLE, timeout_s=3.0)
    assert time.perf_counter() - start < 3.0
    message = str(info.value)
    assert f"cannot reach {UNREACHABLE}" in message
    assert "weights='/path/to/dinov2_vits14_pretrain.pth'" in message
    assert str(hub_cache / "checkpoints" / "dinov2_vits14_pretrain.pth") in message
    assert not (hub_cache / "checkpoints" / "dinov2_vits14_pretrain.pth").exists()


@pytest.mark.parametrize("name", sorted(hub.RELEASED))
def test_offline_mode_never_touches_the_network(hub_cache: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _forbid_network(monkeypatch)
    monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    short = name.split("_")[1]
    filename = f"dinov2_{short}{'_reg4' if name.endswith('_reg') else ''}_pretrain.pth"
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        getattr(hub, name)()  # default weights="LVD142M": the released file
    assert time.perf_counter() - start < 2.0  # fails before building the (up to 1.1B-parameter) model
    message = str(info.value)
    assert "DINOLAB_OFFLINE is set" in message
    assert f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{short}/{filename}" in message
    assert f"weights='/path/to/{filename}'" in message


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("true", True), ("0", False), ("", False), ("no", False)])
def test_offline_switch_values(monkeypatch: pytest.MonkeyPatch, value: str, offline: bool) -> None:
    monkeypatch.setenv("DINOLAB_OFFLINE", value)
    assert hub.is_offline() is offline


def test_cached_file_is_used_without_network(hub_cache: Path, monkeypatch: pytest.MonkeyPatch, random_backbone) -> None:
    """A released file already in the torch.hub cache loads offline, through the default ``weights``."""
    _forbid_network(monkeypatch)
    monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    source = random_backbone("dinov2_vits14_reg", depth=2)
    cached = hub_cache / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    assert download_weights(hub.RELEASED["dinov2_vits14_reg"].url) == cached
    model = hub.dinov2_vits14_reg(depth=2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def send_head(self):
        self.requests.append(f"{self.command} {self.path}")
        return super().send_head()


@pytest.fixture
def loopback_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """An HTTP server on 127.0.0.1 serving a folder: (base URL, folder, list of requests seen)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_CountingHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder, requests
    server.shutdown()
    server.server_close()


def test_downloads_once_then_uses_the_cache(hub_cache: Path, loopback_server, random_backbone) -> None:
    base_url, folder, requests = loopback_server
    source = random_backbone("dinov2_vits14", depth=1)
    torch.save(source.state_dict(), folder / "weights.pth")

    model = hub.dinov2_vits14(weights=f"{base_url}/weights.pth", depth=1)
    cached = hub_cache / "checkpoints" / "weights.pth"
    assert cached.read_bytes() == (folder / "weights.pth").read_bytes()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    seen = len(requests)
    assert seen >= 1 and all(r.endswith("/weights.pth") for r in requests)

    assert download_weights(f"{base_url}/weights.pth") == cached
    assert len(requests) == seen  # not fetched again
    assert [p.name for p in cached.parent.iterdir()] == ["weights.pth"]  # no temporary files left


def test_missing_remote_file_is_reported(hub_cache: Path, loopback_server) -> None:
    base_url, _, _ = loopback_server
    with pytest.raises(WeightsUnavailableError, match=r"does not exist \(HTTP 404\)"):
        download_weights(f"{base_url}/absent.pth")
