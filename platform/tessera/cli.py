"""The `tessera` command: the jobs, serving and the memory planner behind one entry point.

    tessera run STAGE|pipeline [--config C] [--set PATH=VALUE ...]    one stage's job, or all in order
    tessera generate [--captions URI] [--bundle URI] [--output URI] [--config C] [--set ...]
    tessera evaluate [--bundle URI] [--scorer URI] [--config C] [--set ...]
    tessera serve BUNDLE [--port 8000] [--config C] [--set KEY=VALUE ...]
    tessera plan [--config C] [--set ...] [--gpus-per-node 8 ...]      bench/memory_plan.py

Each verb runs the code its script runs: the `main` of jobs/X.py (what `python jobs/X.py` and
`ray job submit ... -- python jobs/X.py` call), serve/app.py's build_app, bench/memory_plan.py's
main. Those folders sit beside platform/ in the repository, not inside the package, so the
command works from a checkout: the one this package is imported from (an editable install, as
`make setup` and the Docker images make), else the current folder. `tessera VERB --help` lists
every config field the verb reads, by the path `--set` takes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import textwrap
from pathlib import Path

SECTIONS_ALWAYS = ("run", "storage", "ray")
# The config sections each verb's job reads besides the ones above (paths under run.root_uri
# aside); `run pipeline` reads them all.
READS = {
    "prepare": ("data", "tokenizer"),
    "train_dvae": ("loader", "dvae", "tracking"),
    "encode": ("encode",),
    "train_prior": ("loader", "prior", "tracking"),
    "train_reranker": ("loader", "reranker", "tracking"),
    "train_scorer": ("loader", "scorer", "tracking"),
    "export": ("export",),
    "evaluate": ("evaluate",),
    "generate": ("generate",),
    "plan": ("prior", "loader", "tokenizer", "dvae"),
}
# Verb flags that are shorthands for one config field: (flag, config path, metavar).
# `tessera generate --image URI` primes every caption with the image's top token rows (the paper's
# image-to-image; --keep-rows, default half the grid).
SHORTHANDS = {
    "generate": (("--captions", "generate.captions_uri", "URI"), ("--bundle", "generate.bundle_uri", "URI"),
                 ("--output", "generate.output_uri", "URI"), ("--image", "generate.image_uri", "URI"),
                 ("--keep-rows", "generate.keep_rows", "N")),
    "evaluate": (("--bundle", "evaluate.bundle_uri", "URI"), ("--scorer", "evaluate.scorer_uri", "URI")),
}
SERVE_APP = "tessera"  # the Serve application's name


class CliError(Exception):
    """A command a user typed cannot run; the message says why."""


# ── where the jobs, the app and the planner are ─────────────────────────────────────────────────
def checkout() -> Path:
    """The repository: above platform/ when tessera is imported from a checkout, else the current folder."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "jobs" / "_common.py").is_file():
            return root
    raise CliError("this command runs the jobs in a tessera checkout (jobs/, serve/, bench/ beside "
                   "platform/), and there is none here: run it from the repository root, or install "
                   "tessera from a checkout with `pip install -e .`")


def import_from_checkout(module: str, folder: str | None = None):
    """jobs/X, bench/X (folder given) or serve.X; the folder goes first on sys.path as it is for
    `python jobs/X.py`, where the jobs import _common and each other by name."""
    root = checkout()
    for path in (root, root / folder) if folder else (root,):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return importlib.import_module(module)


# ── --help: the fields a verb reads ──────────────────────────────────────────────────────────────
def field_help(sections: tuple[str, ...] | None, *, heading: str = "config fields it reads") -> str:
    """Every field of these top-level config sections (None: all), one wrapped entry each."""
    from tessera import config_reference as ref
    from tessera.config import TesseraConfig

    lines = [f"{heading} (--set PATH=VALUE, repeatable; the value is read as YAML;",
             "every field of every section: docs/config.md):"]
    for prefix, model in ref._sections(TesseraConfig):
        if prefix and (sections is None or prefix.split(".", 1)[0] in sections):
            lines += _entries(ref.section_fields(model, prefix))
    return "\n".join(lines)


def _entries(fields) -> list[str]:
    out = []
    for path, kind, default, note in fields:
        head = f"  {path}={default}  ({kind})"
        out += textwrap.wrap(f"{head}  {note}" if note else head, width=100, subsequent_indent=" " * 6,
                             break_on_hyphens=False)
    return out


def _field_note(path: str) -> str:
    from tessera import config_reference as ref
    from tessera.config import TesseraConfig

    section, _, _ = path.partition(".")
    model = TesseraConfig.model_fields[section].annotation
    return {p: note for p, _, _, note in ref.section_fields(model, f"{section}.")}.get(path, "")


def _serve_help() -> str:
    from tessera import config_reference as ref

    try:
        app_args = import_from_checkout("serve.args").AppArgs
    except CliError:
        return "serve arguments: serve/args.py in a tessera checkout"
    fields = [f for f in ref.section_fields(app_args, "") if f[0] != "bundle"]
    return "\n".join(["serve arguments (--set KEY=VALUE, the `args:` of serve/config.yaml; serve/args.py):",
                      *_entries(fields), "", field_help(("ray",), heading="the Ray it starts or joins")])


# ── the verbs ────────────────────────────────────────────────────────────────────────────────────
def _sets(args: argparse.Namespace, verb: str) -> list[str]:
    """--set overrides, with the verb's shorthand flags as more of them (JSON: a YAML string,
    whatever characters a URI holds)."""
    out = list(args.overrides)
    for flag, path, _ in SHORTHANDS.get(verb, ()):
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out.append(f"{path}={json.dumps(value)}")
    return out


def run_job(name: str, config: str, overrides: list[str], *, pipeline_args=None) -> int:
    """jobs/{name}.py's main under its own config loading and error reporting (jobs/_common.py)."""
    module = import_from_checkout(name, "jobs")
    common = import_from_checkout("_common", "jobs")
    main = (lambda cfg: module.main(cfg, pipeline_args)) if name == "pipeline" else module.main
    argv = ["--config", config] + [a for o in overrides for a in ("--set", o)]
    return common.job_main(main, description=module.__doc__, argv=argv)


def serve_bundle(bundle: str, *, config: str, overrides: list[str], port: int) -> int:
    """Serve a bundle on 127.0.0.1:port until Ctrl-C / SIGTERM, in the Ray init_ray starts or joins."""
    from tessera import storage
    from tessera.bundle import BundleError, read_manifest
    from tessera.config import ConfigError, load_config, parse_override

    app_args, ray_sets = {}, []
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "ray":
            ray_sets.append(text)
        elif len(keys) == 1:
            app_args[keys[0]] = value
        else:
            raise ConfigError(f"--set {text!r}: serve arguments are flat (--set max_replicas=2); "
                              "only ray.* fields are dotted")
    # Everything a user can get wrong fails here, before Ray starts.
    cfg = load_config(config, ray_sets)
    parse_args = import_from_checkout("serve.args").parse_args
    try:
        parse_args({"bundle": bundle, **app_args})
        manifest = read_manifest(storage.absolute(bundle))
    except (ValueError, BundleError) as e:
        raise CliError(str(e)) from None
    joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not joined:
        # The replicas of a Ray started here import serve.app and tessera from this checkout.
        root = checkout()
        paths = [str(root), str(root / "platform"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    from tessera.cluster import init_ray

    init_ray(cfg.ray)
    from ray import serve

    build_app = import_from_checkout("serve.app").build_app
    serve.start(http_options={"host": "127.0.0.1", "port": port})  # loopback only: a proxy publishes it
    try:
        serve.run(build_app({"bundle": bundle, **app_args}), name=SERVE_APP, route_prefix="/")
        print(f"serving {manifest['name']} ({bundle}) on http://127.0.0.1:{port}/ — API "
              f"http://127.0.0.1:{port}/v1/images/generations; Ctrl-C stops it", flush=True)
        _wait_for_stop()
    except KeyboardInterrupt:  # Ctrl-C while the app was still starting
        pass
    finally:
        # A Serve this command started goes with it; on a joined cluster only its own app does.
        if joined:
            serve.delete(SERVE_APP)
        else:
            serve.shutdown()
    return 0


def _wait_for_stop() -> None:
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@contextlib.contextmanager
def _prog(name: str):
    """argparse names a program after sys.argv[0]: the planner's usage says `tessera plan`."""
    saved, sys.argv[0] = sys.argv[0], name
    try:
        yield
    finally:
        sys.argv[0] = saved


def plan(argv: list[str]) -> int:
    memory_plan = import_from_checkout("memory_plan", "bench")
    with _prog("tessera plan"):
        if {"-h", "--help"} & set(argv):
            with contextlib.suppress(SystemExit):
                memory_plan.main(["--help"])
            print("\n" + field_help(SECTIONS_ALWAYS + READS["plan"]))
            return 0
        return memory_plan.main(argv)


# ── the parser ───────────────────────────────────────────────────────────────────────────────────
def _common_options(p: argparse.ArgumentParser, set_help: str | None = None) -> None:
    p.add_argument("--config", default="debug",
                   help="YAML path, or a preset name: debug, single_gpu, cluster (default: debug)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help=set_help or "override a config field (repeatable); the fields are listed below")


def _shorthand_options(p: argparse.ArgumentParser, verb: str) -> None:
    for flag, path, metavar in SHORTHANDS.get(verb, ()):
        p.add_argument(flag, metavar=metavar, default=None, help=f"sets {path}: {_field_note(path)}")


def _fill(text: str) -> str:
    return textwrap.fill(text, width=100)


def build_parser() -> argparse.ArgumentParser:
    from tessera.stages import STAGES

    raw = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(prog="tessera", description=__doc__, formatter_class=raw)
    verbs = top.add_subparsers(dest="verb", metavar="VERB", required=True)

    run = verbs.add_parser("run", help="run a pipeline stage's job, or the whole pipeline",
                           formatter_class=raw,
                           description=_fill("Run one stage's job (as python jobs/STAGE.py does), or the "
                           "pipeline: every stage not yet done, in order. `tessera run STAGE --help` "
                           "lists the config fields STAGE reads."))
    stages = run.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGES:
        p = stages.add_parser(stage.name, help=stage.what, formatter_class=raw,
                              description=f"{stage.name}: {stage.what} (jobs/{stage.name}.py)",
                              epilog=field_help(SECTIONS_ALWAYS + READS[stage.name]))
        _common_options(p)
        _shorthand_options(p, stage.name)
    p = stages.add_parser("pipeline", help="every stage not done yet, in order", formatter_class=raw,
                          description=_fill("Every stage in order; a stage whose output is already "
                          "published is skipped, so a rerun resumes (jobs/pipeline.py)."),
                          epilog=field_help(None))
    _common_options(p)
    p.add_argument("--only", default=None, metavar="STAGES", help="comma-separated stages to consider "
                   f"(default: all: {','.join(s.name for s in STAGES)})")
    p.add_argument("--redo", default="", metavar="STAGES", help="comma-separated stages to run even if done")

    for verb, what in (("generate", "batch generation: a file of captions -> PNGs (jobs/generate.py)"),
                       ("evaluate", "evaluate a bundle on its val and held-out captions (jobs/evaluate.py)")):
        p = verbs.add_parser(verb, help=what, description=what, formatter_class=raw,
                             epilog=field_help(SECTIONS_ALWAYS + READS[verb]))
        _common_options(p)
        _shorthand_options(p, verb)

    p = verbs.add_parser("serve", help="serve a bundle over HTTP on 127.0.0.1 (Ray Serve, serve/app.py)",
                         formatter_class=raw, epilog=_serve_help(),
                         description=_fill("Serve a model bundle: the OpenAI-compatible images API and "
                         "the web page on http://127.0.0.1:PORT/, in a local Ray started on 127.0.0.1 (or "
                         "the cluster at RAY_ADDRESS / ray.address), until Ctrl-C."))
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle's URI: a folder, s3:// or gs://")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    _common_options(p, set_help="a serve argument (--set max_replicas=2) or a ray.* config field "
                    "(repeatable); both are listed below")

    verbs.add_parser("plan", add_help=False, help="per-GPU memory and FLOPs of training the prior, "
                     "from a config (bench/memory_plan.py; `tessera plan --help`)")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tessera.config import ConfigError
    from tessera.storage import StorageError

    try:
        if argv[:1] == ["plan"]:  # the planner parses its own options
            return plan(argv[1:])
        args = build_parser().parse_args(argv)
        if args.verb == "run" and args.stage == "pipeline":
            pipeline_args = argparse.Namespace(only=args.only, redo=args.redo)
            return run_job("pipeline", args.config, args.overrides, pipeline_args=pipeline_args)
        if args.verb == "run":
            return run_job(args.stage, args.config, _sets(args, args.stage))
        if args.verb in ("generate", "evaluate"):
            return run_job(args.verb, args.config, _sets(args, args.verb))
        if args.verb == "serve":
            return serve_bundle(args.bundle, config=args.config, overrides=args.overrides, port=args.port)
    except (CliError, ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled verb {argv!r}")


if __name__ == "__main__":
    sys.exit(main())
