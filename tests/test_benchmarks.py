"""The benchmark scripts run end to end on a tiny configuration and print their one JSON line (no timing checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_STEP = [
    "--arch", "vit_tiny", "--depth", "1", "--patch-size", "7", "--batch-size", "2", "--global-size", "28",
    "--local-size", "14", "--local-crops", "2", "--prototypes", "64", "--steps", "1", "--warmup", "0",
    "--device", "cpu", "--threads", "1",
]  # fmt: skip


def _json_line(*args: str) -> dict:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "flags",
    [["--baseline"], ["--activation-checkpointing", "full"], ["--activation-checkpointing", "selective"],
     ["--no-chunked-loss"]],
)  # fmt: skip
def test_train_step_benchmark_prints_one_json_line(flags: list[str]) -> None:
    record = _json_line(str(BENCHMARKS / "train_step.py"), *TINY_STEP, *flags)
    assert record["step_time_s"] > 0 and record["peak_memory_mb"] > 0
    assert record["chunked_loss"] is not ("--baseline" in flags or "--no-chunked-loss" in flags)
    assert record["heads_on_masked_only"] is ("--baseline" not in flags)
    # the mode the step ran with: as asked, none for the baseline, and auto resolved (a tiny step: none)
    assert record["activation_checkpointing"] == (flags[1] if len(flags) == 2 else "none")


def test_profile_step_splits_the_step_into_the_trainers_phases(tmp_path: Path) -> None:
    record = _json_line(str(BENCHMARKS / "profile_step.py"), *TINY_STEP, "--out", str(tmp_path))
    assert record["gflop_per_step"] > 0 and record["fraction_of_matmul_rate"] > 0
    phases = (tmp_path / "phases.md").read_text()
    for phase in ("teacher", "student_backbone", "heads_and_losses", "backward", "optimizer", "ema"):
        assert f"| {phase} |" in phases
    assert "matrix products" in (tmp_path / "operators.md").read_text() and (tmp_path / "trace.json").is_file()


def test_the_lightly_peer_step_runs_when_lightly_is_installed() -> None:
    pytest.importorskip("lightly")
    # an 8 x 8 patch grid: lightly's block masking needs more patches than the tiny step's 4 x 4
    record = _json_line(str(BENCHMARKS / "peer_lightly.py"), *TINY_STEP, "--global-size", "56")
    assert record["step_time_s"] > 0 and record["peer"].startswith("lightly")


def test_inference_benchmark_compares_with_timm_on_the_same_weights() -> None:
    record = _json_line(
        str(BENCHMARKS / "inference.py"), "--model", "vit_small", "--batch-size", "1", "--image-size", "56",
        "--steps", "1", "--warmup", "1", "--device", "cpu",
    )  # fmt: skip
    assert record["max_abs_diff_vs_timm_fp32"] < 1e-4 and record["ratio_vs_timm"] > 0


def test_onnx_inference_benchmark_times_both_runtimes_on_one_export() -> None:
    record = _json_line(
        str(BENCHMARKS / "onnx_inference.py"), "--depth", "1", "--batch-size", "1", "--image-size", "56",
        "--steps", "1", "--warmup", "1", "--threads", "1",
    )  # fmt: skip
    assert record["max_abs_diff_patch_tokens"] < 1e-4 and record["ratio_onnxruntime_vs_torch"] > 0


def test_distributed_curation_benchmark_runs_in_one_process(tmp_path: Path) -> None:
    record = _json_line(
        str(BENCHMARKS / "curation_distributed.py"), "--pool-size", "3000", "--dim", "32", "--clusters", "20,4",
        "--store", str(tmp_path), "--cores", "1",
    )  # fmt: skip
    assert record["processes"] == 1 and record["duplicates_removed"] == 60 and record["selected"] == 300


@pytest.mark.slow
def test_ssl_quality_benchmark_compares_teacher_random_init_and_pixels(tmp_path: Path) -> None:
    command = [
        sys.executable, str(BENCHMARKS / "ssl_quality.py"), "--recipe", "test_tiny", "--datasets", "digits",
        "--seeds", "0", "--split", "train-val", "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    (result,) = json.loads((tmp_path / "results.json").read_text())
    names = [row["name"] for row in result["scores"]]
    assert names == ["pretrained teacher (test_tiny)", "same ViT, random init", "raw pixels"]
    assert all(0 <= row["knn"] <= 100 for row in result["scores"])
    assert result["curves"]["health/dino_row_entropy"] and (tmp_path / "health_curves.png").is_file()
    assert "± " in (tmp_path / "results.md").read_text()


def test_health_overhead_benchmark_times_both_steps() -> None:
    command = [sys.executable, str(BENCHMARKS / "health_overhead.py"), "--recipe", "test_tiny", "--steps", "1"]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "with health" in output and "per iteration" in output


def test_the_ibot_peer_step_runs_from_a_checkout_of_the_ibot_code() -> None:
    """Needs a checkout of github.com/bytedance/ibot (never downloaded by the tests): IBOT_REPO=PATH."""
    repo = os.environ.get("IBOT_REPO")
    if not repo:
        pytest.skip("set IBOT_REPO to a checkout of github.com/bytedance/ibot")
    record = _json_line(str(BENCHMARKS / "peer_ibot.py"), "--ibot-repo", repo, *TINY_STEP, "--global-size", "56")
    assert record["step_time_s"] > 0 and record["peer"].startswith("iBOT code")
