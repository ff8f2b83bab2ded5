"""The shared front door of the commands (dinolab.cli.options): one way to name the backbone, one set of runtime
options, old spellings accepted with a deprecation message."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import torch

from dinolab.cli import options
from dinolab.hub.convert import save_safetensors
from dinolab.models.vit import build_vit

BACKBONE = {"--model", "--weights", "--model-arg"}
RUNTIME = {"--device", "--dtype", "--num-workers", "--seed", "--no-progress"}
# (command module, sub-command path) of every command that reads a backbone
COMMANDS = [
    ("embed", []),
    ("pca", []),
    ("attention", []),
    ("export", []),
    ("eval", ["knn"]),
    ("eval", ["linear"]),
    ("eval", ["logreg"]),
    ("eval", ["segmentation"]),
    ("eval", ["depth"]),
    ("eval", ["retrieval"]),
    ("eval", ["video"]),
    ("curate", ["embed"]),
    ("train", []),
    ("distill", []),
]


def _parser(module: str, path: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dinolab {module}")
    importlib.import_module(f"dinolab.cli.{module}").add_arguments(parser)
    for name in path:  # descend into the sub-command's own parser
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _shown_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


@pytest.mark.parametrize(("module", "path"), COMMANDS, ids=[" ".join([m, *p]) for m, p in COMMANDS])
def test_every_command_shows_the_same_backbone_and_runtime_options(module: str, path: list[str]) -> None:
    shown = _shown_options(_parser(module, path))
    assert shown >= BACKBONE
    assert shown >= (RUNTIME if module != "export" else set())  # export runs its parity check on the CPU
    assert not shown & {"--backbone", "--backbone-arg"}  # old spellings: accepted, not shown


def test_old_spellings_land_in_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser("eval", ["video"]).parse_args(
        ["--backbone", "vit_tiny", "--backbone-arg", "depth=2", "--model-arg", "img_size=56", "--output", "o"]
    )
    assert args.model == "vit_tiny" and args.model_arg == ["depth=2", "img_size=56"]
    err = capsys.readouterr().err
    assert "--backbone is deprecated, write --model" in err and "--backbone-arg is deprecated" in err
    # distill's --student is its documented name for --model (the student's architecture), not deprecated
    args = _parser("distill", []).parse_args(["--student", "vit_small"])
    assert args.model == "vit_small" and "deprecated" not in capsys.readouterr().err


def test_positional_model_is_still_read_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser("embed", []).parse_args(["vit_tiny", "a", "b", "-o", "out"])
    options.take_positional_model(args, "inputs")
    assert (args.model, args.inputs) == ("vit_tiny", ["a", "b"])
    assert "positional MODEL (vit_tiny) is deprecated, write --model vit_tiny" in capsys.readouterr().err
    args = _parser("embed", []).parse_args(["--model", "vit_tiny", "a", "b", "-o", "out"])
    options.take_positional_model(args, "inputs")
    assert (args.model, args.inputs) == ("vit_tiny", ["a", "b"]) and capsys.readouterr().err == ""
    args = _parser("export", []).parse_args(["vit_tiny", "--model", "vit_small", "-o", "x.pth"])
    with pytest.raises(ValueError, match="named twice"):
        options.model_from_positional(args, args.source)


def test_the_dense_default_and_the_default_runtime_values() -> None:
    dense = _parser("eval", ["depth"]).parse_args(["--dataset", "nyu", "--output", "o"])
    assert dense.model == "dinov2_vits14" and dense.num_workers == 4 and dense.dtype == "fp32" and dense.seed == 0
    embed = _parser("pca", []).parse_args(["--model", "m", "x", "-o", "o"])
    assert embed.num_workers == 0 and embed.batch_size == 8 and embed.device is None and not embed.no_progress


def test_weights_go_into_an_architecture_and_not_with_a_checkpoint_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_vit("vit_tiny", depth=2, img_size=56)
    weights = save_safetensors(source, tmp_path / "w.safetensors")
    loaded = options.load_model("vit_tiny", str(weights), {"depth": 2, "img_size": 56})
    expected = source.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert not loaded.training
    with pytest.raises(ValueError, match="--weights applies to released model names"):
        options.load_model(str(weights), str(weights))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        options.load_model(str(tmp_path / "nowhere"))


def test_random_init_follows_the_seed() -> None:
    parser = _parser("eval", ["video"])
    argv = ["--model", "vit_tiny", "--model-arg", "depth=1", "--model-arg", "img_size=28", "--output", "o"]
    first = options.backbone_from_args(parser.parse_args([*argv, "--seed", "3"]))
    again = options.backbone_from_args(parser.parse_args([*argv, "--seed", "3"]))
    other = options.backbone_from_args(parser.parse_args([*argv, "--seed", "4"]))
    torch.testing.assert_close(first.patch_embed.proj.weight, again.patch_embed.proj.weight, rtol=0, atol=0)
    assert not torch.equal(first.patch_embed.proj.weight, other.patch_embed.proj.weight)


def test_model_keywords_are_python_literals() -> None:
    assert options.model_kwargs(["depth=2", "ffn_layer=mlp", "img_size=(56)"]) == {
        "depth": 2,
        "ffn_layer": "mlp",
        "img_size": 56,
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        options.model_kwargs(["depth"])


def test_train_takes_the_front_door_as_config_overrides(tmp_path: Path) -> None:
    from dinolab.cli.train import resolve_config

    argv = ["--recipe", "test_tiny", "--model", "vit_tiny", "--model-arg", "depth=3", "--device", "cpu"]
    argv += ["--seed", "7", "--num-workers", "0", "--dtype", "bf16", "--no-progress", "run.seed=8"]
    config = resolve_config(_parser("train", []).parse_args(argv))
    assert (config.model.arch, config.model.depth) == ("vit_tiny", 3)
    assert (config.run.device, config.run.num_workers, config.run.dtype, config.run.progress) == (
        "cpu",
        0,
        "bf16",
        False,
    )
    assert config.run.seed == 8  # an explicit KEY=VALUE wins over the front door
    untouched = resolve_config(_parser("train", []).parse_args(["--recipe", "test_tiny"]))
    from dinolab.train.recipes import get_recipe

    assert untouched.to_dict() == get_recipe("test_tiny").to_dict()


@pytest.mark.parametrize(
    ("command", "extra", "depth", "batch_size"),
    [("knn", [], 4, 64), ("linear", [], 4, 64), ("linear", ["--n-last-blocks", "1", "8", "--batch-size", "8"], 8, 8)],
)
def test_evaluation_configs_come_from_the_options(command, extra, depth, batch_size):
    """The configs are built from the options by name (dinolab.config.from_namespace): the linear probe's own
    --train-batch-size does not leak into extraction, and extraction keeps enough blocks for --n-last-blocks."""
    from dinolab.cli.eval_classification import extraction_config

    options = ["--train", "t", "--val", "v", "--model", "vit_small", "--output", "o", *extra]
    args = _parser("eval", [command]).parse_args(options)
    config = extraction_config(args)
    assert (config.n_last_blocks, config.batch_size, config.resize, config.crop) == (depth, batch_size, 256, 224)
