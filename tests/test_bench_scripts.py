"""The bench scripts run and print what they promise (their figures are read by people, not here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_prints_one_json_line_with_both_rates():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"),
         "--dim", "32", "--depth", "2", "--heads", "4",
         "--text-len", "8", "--grid", "4", "--text-vocab", "64", "--image-vocab", "16", "--batch", "2",
         "--threads", "1", "--attention", "sparse", "--steps", "2", "--warmup", "1", "--repeats", "1"],
        capture_output=True, text=True, check=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["tokens_per_step"] == 2 * (8 + 16)
    assert r["tessera_tokens_per_s"] > 0 and r["reference_tokens_per_s"] > 0
    assert abs(r["ratio"] - r["tessera_tokens_per_s"] / r["reference_tokens_per_s"]) < 1e-2
    assert r["shape"]["attention"] == "sparse"
