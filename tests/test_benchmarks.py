"""The benchmark scripts run end to end on a tiny configuration and print their one JSON line (no timing checked)."""

import json
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


@pytest.mark.parametrize("flags", [["--baseline"], ["--activation-checkpointing"], ["--no-chunked-loss"]])
def test_train_step_benchmark_prints_one_json_line(flags: list[str]) -> None:
    record = _json_line(str(BENCHMARKS / "train_step.py"), *TINY_STEP, *flags)
    assert record["step_time_s"] > 0 and record["peak_memory_mb"] > 0
    assert record["chunked_loss"] is not ("--baseline" in flags or "--no-chunked-loss" in flags)
    assert record["heads_on_masked_only"] is ("--baseline" not in flags)


def test_inference_benchmark_compares_with_timm_on_the_same_weights() -> None:
    record = _json_line(
        str(BENCHMARKS / "inference.py"), "--model", "vit_small", "--batch-size", "1", "--image-size", "56",
        "--steps", "1", "--warmup", "1", "--device", "cpu",
    )  # fmt: skip
    assert record["max_abs_diff_vs_timm_fp32"] < 1e-4 and record["ratio_vs_timm"] > 0
