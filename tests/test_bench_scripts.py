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


def test_prepare_scale_makes_inputs_and_measures_each_size(tmp_path):
    script = [sys.executable, str(ROOT / "bench" / "prepare_scale.py")]
    inputs, results = tmp_path / "inputs", tmp_path / "results.json"
    subprocess.run([*script, "--make-inputs", str(inputs), "--max-size", "2000", "--base-shards", "1",
                    "--image-size", "64"], capture_output=True, text=True, check=True, timeout=120)
    assert sorted(p.name for p in inputs.glob("*.tar")) == ["00000.tar", "00001.tar"]
    out = subprocess.run([*script, "--inputs", str(inputs), "--work", str(tmp_path / "work"),
                          "--sizes", "1000,2000", "--impl", "new", "--num-cpus", "1",
                          "--object-store-mb", "100", "--timeout-s", "120", "--json-out", str(results)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads(results.read_text())["results"]
    assert [(r["impl"], r["size"]) for r in runs] == [("new", 1000), ("new", 2000)]
    for r in runs:
        assert r["ok"], r["error"]
        assert r["input_samples"] == r["size"]
        assert 0.9 * r["size"] < r["kept_samples"] <= r["size"]
        assert r["samples_per_s"] > 0 and r["driver_peak_rss_mb"] > 0
    assert "samples/s(largest ok size) / samples/s(smallest size)" in out.stdout
