"""Deployment files, offline: the cluster launcher YAMLs pass Ray's own schema, every KubeRay
manifest runs an existing job with a config that validates, the RayService's Serve config passes
Ray Serve's schema and tessera's argument model, the images are the pinned Ray version's, and
`ray job submit --working-dir .` uploads the source without runs/ or .venv/.

Nothing here needs a cloud account, credentials or the network.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

from tessera.config import load_config, preset_paths

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCHER_YAMLS = sorted((INFRA / "cluster").glob("*.yaml"))
KUBERAY_YAMLS = sorted((INFRA / "kuberay").glob("*.yaml"))
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile*"))
# The pipeline's stages, one RayJob each (jobs/ has other entrypoints too, e.g. local helpers).
TRAINING_JOBS = ["encode.py", "export.py", "prepare.py", "train_dvae.py", "train_prior.py",
                 "train_reranker.py"]
# What an image reference of ours looks like: <registry>/tessera:<ray version>-<gpu|cpu>.
IMAGE = re.compile(r"/tessera:(?P<ray>[0-9.]+)-(?P<kind>gpu|cpu)$")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kuberay(kind: str) -> list[dict]:
    return [d for p in KUBERAY_YAMLS for d in _docs(p) if d.get("kind") == kind]


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec.get("workerGroupSpecs", [])]


# --- Ray cluster launcher ------------------------------------------------------------------------


def test_launcher_yamls_exist_for_both_clouds():
    assert [p.name for p in LAUNCHER_YAMLS] == ["aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    config = prepare_config(raw)  # fills Ray's defaults for the provider; no cloud calls
    validate_config(config)  # ray-schema.json plus the launcher's own consistency checks
    # Our start/setup commands replaced Ray's defaults (which pip-install a nightly Ray wheel).
    assert config["setup_commands"] == [] and config["worker_setup_commands"] == []
    assert not any("pip install" in c and "ray" in c for c in config["head_setup_commands"])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_node_types(path):
    raw = yaml.safe_load(path.read_text())
    types = raw["available_node_types"]
    head, cpu, gpu = types[raw["head_node_type"]], types["cpu_worker"], types["gpu_worker"]
    assert head["resources"] == {"CPU": 0} and head.get("max_workers", 0) == 0
    # 8-GPU nodes for the prior's per-node groups; CPU workers for Ray Data; both autoscale from 0.
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] == 0 < gpu["max_workers"]
    assert "GPU" not in cpu["resources"] and cpu["min_workers"] == 0 < cpu["max_workers"]
    assert raw["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]
    assert raw["idle_timeout_minutes"] > 0 and cpu["idle_timeout_s"] > 0

    def spot(node_type: dict) -> bool:
        cfg = node_type["node_config"]
        return (cfg.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or cfg.get("scheduling", {}).get("provisioningModel") == "SPOT")

    assert spot(cpu) and not spot(gpu) and not spot(head)
    # The prior's cluster preset fits the GPU group.
    prior = load_config(ROOT / "jobs/configs/cluster.yaml").prior
    assert prior.num_workers <= gpu["max_workers"] * gpu["resources"]["GPU"]
    assert prior.num_workers % gpu["resources"]["GPU"] == 0


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_images_and_auth(path):
    raw = yaml.safe_load(path.read_text())
    docker = raw["docker"]
    images = {docker["image"], docker["head_image"]} | {
        t["docker"]["worker_image"] for t in raw["available_node_types"].values() if "docker" in t}
    kinds = set()
    for image in images:
        m = IMAGE.search(image)
        assert m and m["ray"] == ray.__version__, image
        kinds.add(m["kind"])
    assert kinds == {"gpu", "cpu"}
    assert (IMAGE.search(docker["image"])["kind"] == "gpu"
            and IMAGE.search(docker["head_image"])["kind"] == "cpu")
    assert IMAGE.search(raw["available_node_types"]["cpu_worker"]["docker"]["worker_image"])["kind"] == "cpu"
    # Token authentication in every container, with the token from a file written at node start.
    options = " ".join(docker["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "RAY_AUTH_TOKEN_PATH=" in options
    assert "RAY_AUTH_TOKEN=" not in options
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_aws_nodes_run_under_instance_profiles():
    raw = yaml.safe_load((INFRA / "cluster/aws.yaml").read_text())
    for name, node_type in raw["available_node_types"].items():
        profile = node_type["node_config"]["IamInstanceProfile"]
        assert profile["Name"] == ("tessera-ray-head" if name == raw["head_node_type"]
                                   else "tessera-ray-worker")
    for policy in (INFRA / "cluster/iam").glob("*.json"):
        yaml.safe_load(policy.read_text())  # JSON is YAML: at least well-formed


def test_gcp_workers_run_as_a_service_account():
    raw = yaml.safe_load((INFRA / "cluster/gcp.yaml").read_text())
    for name, node_type in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue  # the launcher gives the head its own service account
        (account,) = node_type["node_config"]["serviceAccounts"]
        assert account["email"].startswith("tessera-ray-worker@")
    assert (raw["available_node_types"]["gpu_worker"]["node_config"]["scheduling"]["onHostMaintenance"]
            == "TERMINATE")


_CLI_STUB = """#!/bin/sh
# A stand-in for the cloud CLI on a node: the Ray token always, the API-key secret as $STUB_KEYS says.
case "$*" in
  *serve-api-keys*)
    case "$STUB_KEYS" in
      missing) echo "An error occurred (ParameterNotFound) / NOT_FOUND: secret not found" >&2; exit 254 ;;
      empty) echo; exit 0 ;;
      *) echo "$STUB_KEYS"; exit 0 ;;
    esac ;;
  *) echo ray-token ;;
esac
"""


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_stops_when_the_api_key_secret_is_missing(path, tmp_path):
    """The node command that writes TESSERA_API_KEYS, run as the launcher runs it (bash -c on the
    host) against a stand-in CLI: a missing or empty secret fails it, naming the secret."""
    import os
    import subprocess

    raw = yaml.safe_load(path.read_text())
    (command,) = [c for c in raw["initialization_commands"] if "serve-api-keys" in c]
    assert "|| true" not in command and "2>/dev/null" not in command
    secret = "/tessera/serve-api-keys" if raw["provider"]["type"] == "aws" else "tessera-serve-api-keys"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for cli in ("aws", "gcloud"):
        (bin_dir / cli).write_text(_CLI_STUB)
        (bin_dir / cli).chmod(0o755)

    def run(keys: str) -> tuple[subprocess.CompletedProcess, Path]:
        home = tmp_path / keys
        home.mkdir()
        env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_KEYS": keys}
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                              timeout=30), home / ".tessera" / "serve.env"

    for keys in ("missing", "empty"):
        done, env_file = run(keys)
        assert done.returncode != 0, (keys, done.stdout, done.stderr)
        assert secret in done.stderr and "docs/deploy.md" in done.stderr, done.stderr
        assert not env_file.exists() or "TESSERA_API_KEYS=\n" not in env_file.read_text()
    done, env_file = run("k1,k2")
    assert done.returncode == 0, done.stderr
    assert env_file.read_text() == "TESSERA_API_KEYS=k1,k2\n"
    assert os.stat(env_file).st_mode & 0o777 == 0o600
    assert "--env-file $HOME/.tessera/serve.env" in " ".join(raw["docker"]["run_options"])


def test_no_credentials_in_deployment_files():
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [ROOT / "docs/deploy.md", ROOT / ".rayignore",
                                                           ROOT / ".dockerignore"]
    # Cloud keys, private keys, and a token or API key written out as a literal value.
    secret = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN (RSA |OPENSSH )?PRIVATE KEY|"
                        r"\"private_key\"|ssh_private_key:|(?m:^\s*(auth_token|api_keys):\s*[\"']?\w{12,})|"
                        r"RAY_AUTH_TOKEN=\w{12,}|TESSERA_API_KEYS=\w{12,}")
    for p in files:
        assert not secret.search(p.read_text()), p


# --- Docker images ---------------------------------------------------------------------------------


def _from_lines(path: Path) -> list[str]:
    return [line.split()[1] for line in path.read_text().splitlines() if line.upper().startswith("FROM ")]


def test_dockerfiles_build_from_the_pinned_ray_image():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.cpu"}
    py = f"py{sys.version_info.major}{sys.version_info.minor}"  # the .venv's Python, as constraints.txt
    expected = {"Dockerfile": rf"rayproject/ray:{re.escape(ray.__version__)}-{py}-cu12\d+",
                "Dockerfile.cpu": rf"rayproject/ray:{re.escape(ray.__version__)}-{py}-cpu"}
    for path in DOCKERFILES:
        (base,) = _from_lines(path)
        assert re.fullmatch(expected[path.name], base), (path.name, base)
        text = path.read_text()
        assert "-r requirements/base.txt -c requirements/constraints.txt" in text
        assert "pip install --no-deps -e ." in text
        assert "WORKDIR /home/ray/tessera" in text and "PYTHONPATH=/home/ray/tessera" in text
        # The same torch the Makefile installs.
        torch_pin = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text())[1]
        assert f"ARG TORCH_VERSION={torch_pin}" in text
    gpu_cuda = re.search(r"-cu(\d+)$", _from_lines(INFRA / "docker/Dockerfile")[0])[1]
    assert f"whl/cu{gpu_cuda}" in (INFRA / "docker/Dockerfile").read_text()  # torch built for that CUDA


def test_ray_pin_matches_the_installed_ray():
    base = (ROOT / "requirements/base.txt").read_text()
    assert re.search(rf"^ray\[[^\]]*\]=={re.escape(ray.__version__)}$", base, re.M)


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


# --- KubeRay ---------------------------------------------------------------------------------------


def test_kuberay_rayjob_per_training_job():
    jobs = _kuberay("RayJob")
    scripts = []
    (cluster,) = _kuberay("RayCluster")
    for job in jobs:
        spec = job["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python" and len(argv) == 4 and argv[2] == "--config", argv
        script, config = ROOT / argv[1], argv[3]
        assert script.parent == ROOT / "jobs" and script.is_file(), argv[1]
        assert config == "jobs/configs/cluster.yaml"
        cfg = load_config(ROOT / config)  # validates, naming any field at fault
        assert cfg.run.root_uri.startswith("s3://")
        scripts.append(script.name)
        # It runs on the RayCluster, and its submitter authenticates with that cluster's token.
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
        env = {e["name"]: e for e in submitter["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert (env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
                == cluster["spec"]["authOptions"]["secretName"])
        assert IMAGE.search(submitter["image"])["ray"] == ray.__version__
    assert sorted(scripts) == TRAINING_JOBS


def test_kuberay_clusters_use_the_service_account_image_and_ray_version():
    (account,) = _kuberay("ServiceAccount")
    annotations = account["metadata"]["annotations"]
    assert "eks.amazonaws.com/role-arn" in annotations and "iam.gke.io/gcp-service-account" in annotations
    (cluster,) = _kuberay("RayCluster")
    (service,) = _kuberay("RayService")
    for spec in (cluster["spec"], service["spec"]["rayClusterConfig"]):
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for pod in _pod_specs(spec):
            assert pod["serviceAccountName"] == account["metadata"]["name"]
            (container,) = pod["containers"]
            assert container["workingDir"] == "/home/ray/tessera"  # where `jobs/` and `serve/` are
            m = IMAGE.search(container["image"])
            assert m and m["ray"] == ray.__version__
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            assert m["kind"] == ("gpu" if gpus else "cpu"), container["image"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_rayservice_serves_the_serve_config():
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from serve.args import AppArgs, parse_args

    (service,) = _kuberay("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    # Ray's models ignore unknown keys; a typo there would be silently dropped, so check the keys too.
    assert set(config) <= set(ServeDeploySchema.model_fields)
    (app,) = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert config == yaml.safe_load((INFRA / "serve/cluster.yaml").read_text())

    local = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
    (local_app,) = local["applications"]
    assert schema.applications[0].import_path == local_app["import_path"] == "serve.app:build_app"
    assert app["name"] == local_app["name"] and app["route_prefix"] == local_app["route_prefix"]
    assert set(local_app["args"]) <= set(app["args"]) <= set(AppArgs.model_fields)
    args = parse_args(app["args"], environ={})  # serve/args.py's own validation, unknown keys refused
    assert args.device == "cuda" and args.num_gpus >= 1
    assert args.bundle.startswith("s3://")
    assert config["http_options"]["host"] == "0.0.0.0"  # reachable through the serve Service


def test_rayservice_needs_the_api_key_secret():
    # A missing Secret stops the pods (Kubernetes names it); `optional: true` would start them
    # without keys. The app itself then refuses an empty key list on 0.0.0.0 (tests/test_serve_auth.py).
    (service,) = _kuberay("RayService")
    containers = [c for pod in _pod_specs(service["spec"]["rayClusterConfig"]) for c in pod["containers"]]
    assert containers
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        ref = env["TESSERA_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "tessera-serve-api-keys" and ref["key"] == "api_keys"
        assert not ref.get("optional", False), container["name"]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["api_keys"] == [] and not args["allow_anonymous"]  # keys from the Secret only
    assert "kubectl create secret generic tessera-serve-api-keys" in (ROOT / "docs/deploy.md").read_text()


def test_every_kuberay_manifest_is_a_known_kind():
    kinds = {d["kind"] for p in KUBERAY_YAMLS for d in _docs(p)}
    assert kinds == {"ServiceAccount", "RayCluster", "RayJob", "RayService"}
    for p in KUBERAY_YAMLS:
        for d in _docs(p):
            assert d["apiVersion"] == ("v1" if d["kind"] == "ServiceAccount" else "ray.io/v1"), p


# --- Job presets -----------------------------------------------------------------------------------


def test_presets_include_single_gpu_and_cluster():
    names = {p.stem for p in preset_paths()}
    assert {"debug", "single_gpu", "cluster"} <= names
    for p in preset_paths():
        load_config(p)


def test_single_gpu_preset():
    cfg = load_config("single_gpu")
    for stage in (cfg.dvae, cfg.prior, cfg.reranker):
        assert stage.use_gpu and stage.num_workers == 1
    assert cfg.encode.actors.use_gpu and cfg.prior.precision == "bf16"
    assert cfg.dvae.size == "small" and cfg.prior.dim > 512  # mid-size: above the `small` prior


def test_cluster_preset_is_paper_shaped():
    from tessera.models.dvae import NAMED_SHAPES

    cfg = load_config("cluster")
    shape = NAMED_SHAPES[cfg.dvae.size]
    assert (shape.image_size, shape.grid_size, shape.num_tokens) == (256, 32, 8192)
    assert cfg.data.resolution == shape.image_size
    assert cfg.tokenizer.vocab_size == 16384 and cfg.loader.text_len == 256
    p = cfg.prior
    assert p.use_gpu and p.zero_stage == 3 and p.grad_comm.method in ("zeropp", "powersgd")
    assert p.num_workers % 8 == 0 and p.placement_strategy == "PACK"
    assert p.micro_batch * p.grad_accum * p.num_workers == 1024  # the paper's batch
    for uri in (cfg.run.root_uri, cfg.data.source.uri):
        assert uri.startswith("s3://")
    assert cfg.dvae.use_gpu and cfg.encode.actors.use_gpu and cfg.reranker.use_gpu


# --- What `ray job submit --working-dir .` uploads ---------------------------------------------


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["with-gitignore", "rayignore-only"])
def test_working_dir_upload_leaves_local_state_out(include_gitignore):
    from ray._private.runtime_env.packaging import _dir_travel

    files: list[Path] = []
    _dir_travel(ROOT, [], lambda p: files.append(p) if p.is_file() else None,
                include_gitignore=include_gitignore)
    top = {p.relative_to(ROOT).parts[0] for p in files}
    assert {"jobs", "platform", "serve", "infra"} <= top
    assert not top & {".venv", "runs", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis"}
    assert not any("__pycache__" in p.parts for p in files)
    assert sum(p.stat().st_size for p in files) < 8 * 2**20  # Ray warns at 10 MiB per file, refuses ~500 MiB


def test_job_runtime_env_ships_the_checkouts_tessera():
    env = yaml.safe_load((INFRA / "job-runtime-env.yaml").read_text())
    assert "working_dir" not in env  # given as --working-dir .
    assert env["py_modules"] == ["platform/tessera"] and (ROOT / "platform/tessera/__init__.py").is_file()
    assert "__pycache__/" in env["excludes"]


def test_deploy_doc_names_existing_files():
    text = (ROOT / "docs/deploy.md").read_text()
    paths = set(re.findall(r"(?<![\w.-])((?:infra|jobs|serve|docs)/[\w./-]+\.(?:ya?ml|py|md|json)|"
                           r"infra/docker/Dockerfile(?:\.cpu)?)", text))
    assert paths, "docs/deploy.md names no files"
    for p in sorted(paths):
        assert (ROOT / p).is_file(), f"docs/deploy.md names {p}, which does not exist"
