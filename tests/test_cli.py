"""The `tessera` command (tessera.cli): every verb's --help lists the config fields it reads by path;
`run` dispatches to the jobs' own code (a real prepare on the session's Ray, the pipeline's skip);
user errors exit 2 naming the field; `serve` serves a real bundle on 127.0.0.1 and stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import free_port

from tessera import cli
from tessera import config_reference as ref
from tessera.config import TesseraConfig
from tessera.stages import NAMES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def paths_of(section: str) -> list[str]:
    """Every field path under a top-level config section, nested sections included."""
    return [path for prefix, model in ref._sections(TesseraConfig) if prefix.split(".", 1)[0] == section
            for path, *_ in ref.section_fields(model, prefix)]


@pytest.mark.parametrize("stage", NAMES)
def test_run_stage_help_lists_every_field_the_stage_reads(stage, capsys):
    out = help_text(capsys, "run", stage)
    for section in cli.SECTIONS_ALWAYS + cli.READS[stage]:
        missing = [p for p in paths_of(section) if f"  {p}=" not in out]
        assert not missing, f"`tessera run {stage} --help` does not list {missing}"
    assert "--config" in out and "--set PATH=VALUE" in out
    if stage != "train_prior":
        assert "  prior.steps=" not in out  # only what the stage reads


def test_pipeline_help_lists_every_field_and_its_own_options(capsys):
    out = help_text(capsys, "run", "pipeline")
    for section in TesseraConfig.model_fields:
        assert all(f"  {p}=" in out for p in paths_of(section)), section
    assert "--only STAGES" in out and "--redo STAGES" in out


@pytest.mark.parametrize("verb, flags", [("generate", {"--captions": "generate.captions_uri",
                                                       "--bundle": "generate.bundle_uri",
                                                       "--output": "generate.output_uri",
                                                       "--image": "generate.image_uri"}),
                                         ("evaluate", {"--bundle": "evaluate.bundle_uri",
                                                       "--scorer": "evaluate.scorer_uri"})])
def test_generate_and_evaluate_help_map_their_flags_to_config_paths(verb, flags, capsys):
    out = help_text(capsys, verb)
    for flag, path in flags.items():
        assert f"{flag} URI" in out and f"sets {path}:" in out
    assert all(f"  {p}=" in out for p in paths_of(verb))
    assert "  generate.sampling.temperature=1.0  (float)" in help_text(capsys, "generate")
    assert "--keep-rows N" in help_text(capsys, "generate")


def test_serve_help_lists_the_app_arguments_and_the_ray_fields(capsys):
    from serve.args import AppArgs

    out = help_text(capsys, "serve")
    assert all(f"  {name}=" in out for name in AppArgs.model_fields if name != "bundle")
    assert all(f"  {p}=" in out for p in paths_of("ray"))
    assert "BUNDLE" in out and "--port PORT" in out and "  data.resolution=" not in out


def test_plan_help_is_the_planner_s_with_the_fields_it_reads(capsys):
    assert cli.main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tessera plan") and "--gpus-per-node" in out and "--sdpa-kernel" in out
    assert "  prior.dim=null  (int | None)" in out and "  tokenizer.vocab_size=" in out


def test_plan_prints_the_memory_plan_of_a_config(capsys):
    argv = ["--config", "debug", "--set", "prior.num_workers=4", "--gpus-per-node", "2", "--json"]
    assert cli.main(["plan", *argv]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["world"] == 4 and plan["nodes"] == 2


def test_the_console_script_and_python_m_run_the_cli(tmp_path):
    assert '[project.scripts]\ntessera = "tessera.cli:main"' in (ROOT / "pyproject.toml").read_text()
    for command in ([str(BIN / "tessera"), "--help"], [sys.executable, "-m", "tessera", "--help"]):
        r = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert all(verb in r.stdout for verb in ("run", "generate", "evaluate", "serve", "plan"))


@pytest.mark.integration
def test_run_prepare_then_the_pipeline_skips_it(ray_cluster, tmp_path, capsys):
    """`tessera run prepare` from outside the checkout, joining the session's Ray: the job's own
    code writes the dataset; `tessera run pipeline --only prepare` then finds it done."""
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    sets = [a for o in (f"run.root_uri={tmp_path}", "data.source.shapes.num_samples=60",
                        "data.source.shapes.num_heldout=6", "data.resolution=32") for a in ("--set", o)]
    r = subprocess.run([sys.executable, "-m", "tessera", "run", "prepare", "--config", "debug", *sets],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["input_samples"] == 66 and manifest["kept_samples"] == 66

    assert cli.main(["run", "pipeline", "--only", "prepare", *sets]) == 0
    assert "prepare (image shards + tokenizer): done, skipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "pipeline.json").read_text()) == {"prepare": {"status": "skipped",
                                                                                "seconds": 0.0}}


@pytest.mark.parametrize("argv, message", [
    (["run", "prepare", "--set", "data.resolution=abc"], "data.resolution: Input should be a valid integer"),
    (["run", "train_dvae", "--set", "tracking.kind=neptune"], "tracking.kind: Input should be"),
    (["generate"], "generate.captions_uri: not set"),
    (["serve", "{tmp}/no-bundle"], "{tmp}/no-bundle: no manifest.json"),
    (["serve", "{tmp}/no-bundle", "--set", "ray.nope=1"], "ray.nope: unknown field"),
    (["serve", "{tmp}/no-bundle", "--set", "autoscaling.max=1"], "serve arguments are flat"),
    (["serve", "{tmp}/no-bundle", "--set", "max_replicas=0"], "max_replicas"),
])
def test_user_errors_exit_2_naming_what_is_wrong(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_generate_flags_reach_the_job_as_config_paths(tmp_path, capsys):
    """--captions and --bundle become generate.captions_uri / generate.bundle_uri (a path with
    YAML-special characters stays a string): the job names the missing bundle it was given."""
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n")
    bundle = tmp_path / "no: bundle #1"
    assert cli.main(["generate", "--captions", str(captions), "--bundle", str(bundle)]) == 2
    assert f"{bundle}: no manifest.json" in capsys.readouterr().err


def test_generate_image_reaches_the_job(tmp_path, capsys):
    """--image / --keep-rows become generate.image_uri / generate.keep_rows: the job checks the
    image against the bundle before Ray starts and names the field."""
    from bundles import make_bundle

    bundle = make_bundle(tmp_path / "b", reranker=False)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n")
    not_image = tmp_path / "photo.png"
    not_image.write_bytes(b"not a png")
    argv = ["generate", "--captions", str(captions), "--bundle", bundle, "--image", str(not_image)]
    assert cli.main(argv) == 2
    assert "generate.image_uri" in capsys.readouterr().err
    assert cli.main([*argv[:-2], "--keep-rows", "2"]) == 2  # rows kept of no image
    assert "generate: keep_rows: only applies with an image" in capsys.readouterr().err


def test_unknown_stage_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "train_vae"])
    assert exit_.value.code == 2
    assert "invalid choice: 'train_vae'" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_serve_answers_on_loopback_and_stops_on_ctrl_c(tmp_path):
    """`tessera serve BUNDLE` in its own process: a local Ray and Serve on 127.0.0.1 only, the
    API answering with the bundle's model, and a clean exit on SIGINT."""
    from bundles import make_bundle

    bundle = make_bundle(tmp_path / "b", seed=0, reranker=False, name="tessera-cli")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "tessera", "serve", bundle, "--port", str(port),
                             "--set", "num_cpus=0.5", "--set", "ray.num_cpus=2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base, ready = f"http://127.0.0.1:{port}", f"serving tessera-cli ({bundle}) on http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not any(ready in line for line in lines):
            time.sleep(0.5)
        assert proc.poll() is None and any(ready in line for line in lines), "".join(lines)[-3000:]
        assert requests.get(f"{base}/healthz", timeout=30).json()["model"] == "tessera-cli"
        models = requests.get(f"{base}/v1/models", timeout=30)
        assert models.status_code == 200, models.text
        assert [m["id"] for m in models.json()["data"]] == ["tessera-cli"]
        r = requests.post(f"{base}/v1/images/generations", json={"prompt": "a red circle", "seed": 1},
                          timeout=120)
        assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text

        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        pids = {p.pid for p in tree}
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert any(c.laddr.port == port for c in listening)
        loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
        assert [c.laddr for c in listening if c.laddr.ip not in loopback] == []

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
        assert proc.returncode == 0, "".join(lines)[-3000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/healthz", timeout=5)
    finally:
        if proc.poll() is None:  # only this test's own process tree
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.wait(timeout=30)
