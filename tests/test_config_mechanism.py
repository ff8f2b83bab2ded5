"""The one configuration mechanism (dinolab.config) on small configs of every shape the commands use."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dinolab.config import ConfigError, apply_overrides, from_dict, from_namespace, read_config_file, to_dict


@dataclass(frozen=True, kw_only=True)
class Store:
    store: Path
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Stage:
    threshold: float = 0.95
    store: Store | None = None

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


@dataclass(frozen=True, kw_only=True)
class Job:
    output: Path
    stage: Stage | None = None
    clusters: tuple[int, ...] = (10, 2)
    size: tuple[int, int] = (3, 4)
    seeds: tuple[Store, ...] = ()
    target: int | None = None
    verbose: bool = False
    names: list[str] = field(default_factory=list)


def test_nested_mapping_is_converted_to_the_declared_types():
    job = from_dict(
        Job,
        {
            "output": "out",
            "stage": {"threshold": "0.9", "store": {"store": "s", "inputs": ["a", "b"]}},
            "clusters": [5, 3, 2],
            "size": ["1", "2"],
            "seeds": [{"store": "x"}, {"store": "y"}],
            "target": "7",
            "verbose": "yes",
        },
    )
    assert job == Job(
        output=Path("out"),
        stage=Stage(threshold=0.9, store=Store(store=Path("s"), inputs=("a", "b"))),
        clusters=(5, 3, 2),
        size=(1, 2),
        seeds=(Store(store=Path("x")), Store(store=Path("y"))),
        target=7,
        verbose=True,
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"output": "o", "stage": {"treshold": 0.5}}, "stage.treshold"),
        ({"output": "o", "stage": {"threshold": 2.0}}, "stage: threshold must be in"),
        ({"output": "o", "size": [1, 2, 3]}, "size needs 2 values"),
        ({"output": "o", "clusters": ["ten"]}, r"clusters\[0\]: cannot read 'ten' as int"),
        ({"output": "o", "verbose": "maybe"}, "verbose must be true or false"),
        ({"output": "o", "stage": 3}, "stage must be a section"),
        ({"output": "o", "target": 2.5}, "target must be an integer"),
    ],
)
def test_bad_values_fail_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Job, data)


def test_overrides_convert_strings_and_create_absent_sections():
    job = from_dict(Job, {"output": "o"})
    changed = apply_overrides(job, ["stage.threshold=0.8", "clusters=4,2", "target=none", "names=a,b", "output=p"])
    assert changed.stage == Stage(threshold=0.8)
    assert changed.clusters == (4, 2) and changed.target is None and changed.names == ["a", "b"]
    assert changed.output == Path("p")
    assert apply_overrides(changed, ["target=12"]).target == 12
    assert apply_overrides(changed, ["stage.store.store=z"]).stage.store == Store(store=Path("z"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.nope=1", "unknown config key 'stage.nope'"),
        ("stag.threshold=1", "unknown config section 'stag'"),
        ("clusters.x=1", "unknown config section 'clusters'"),
        ("target", "section.key=value"),
        ("stage.threshold=0", "threshold must be in"),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(from_dict(Job, {"output": "o"}), [override])


def test_round_trip_through_json_and_toml_files(tmp_path):
    job = apply_overrides(from_dict(Job, {"output": "o"}), ["stage.store.store=s", "seeds=[]", "target=3"])
    data = to_dict(job)
    assert data["stage"]["store"]["store"] == "s" and data["clusters"] == [10, 2]
    (tmp_path / "job.json").write_text(json.dumps(data))
    assert from_dict(Job, read_config_file(tmp_path / "job.json")) == job
    (tmp_path / "job.toml").write_text(
        'output = "o"\ntarget = 3\n[stage]\nthreshold = 0.95\n[stage.store]\nstore = "s"\n'
    )
    assert from_dict(Job, read_config_file(tmp_path / "job.toml")) == job


def test_unreadable_config_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("output = \n")
    with pytest.raises(ConfigError, match=r"cannot read config file .*broken\.toml"):
        read_config_file(tmp_path / "broken.toml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_config_file(tmp_path / "list.json")


@dataclass(frozen=True, kw_only=True)
class Probe:
    ks: tuple[int, ...] = (10, 20)
    batch_size: int = 128
    weighting: str = "exp"
    progress: bool = True
    device: str | None = None


def test_from_namespace_takes_options_by_name_and_explicit_values_win():
    args = argparse.Namespace(ks=[5, 7], batch_size=32, train_batch_size=16, no_progress=True, device=None, other=1)
    probe = from_namespace(Probe, args, batch_size=args.train_batch_size, weighting="uniform")
    assert probe == Probe(ks=(5, 7), batch_size=16, weighting="uniform", progress=False, device=None)
    with pytest.raises(ConfigError, match="ks"):
        from_namespace(Probe, argparse.Namespace(ks=["x"]))
