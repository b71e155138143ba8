import pytest

from tessera.config import ConfigError, load_config, preset_paths


def test_every_preset_loads():
    paths = preset_paths()
    assert any(p.stem == "debug" for p in paths)
    for p in paths:
        cfg = load_config(p)
        assert cfg.data.resolution >= 8


def test_override_changes_typed_value():
    cfg = load_config("debug", ["data.resolution=32", "data.source.shapes.held_out=[red circle, blue square]",
                                "ray.address=null"])
    assert cfg.data.resolution == 32 and isinstance(cfg.data.resolution, int)
    assert cfg.data.source.shapes.held_out == ["red circle", "blue square"]
    assert cfg.ray.address is None


@pytest.mark.parametrize(
    "override, path, words",
    [
        ("data.resolutoin=64", "data.resolutoin", "unknown field"),
        ("data.resolution=-1", "data.resolution", "greater than or equal"),
        ("data.resolution=big", "data.resolution", "integer"),
        ("data.source.kind=csv", "data.source.kind", "shapes"),
        ("loader.batch_size=0", "loader.batch_size", "greater than"),
        ("nosuchsection.x=1", "nosuchsection", "unknown field"),
    ],
)
def test_bad_values_name_their_field(override, path, words):
    with pytest.raises(ConfigError) as e:
        load_config("debug", [override])
    msg = str(e.value)
    assert path in msg and words in msg and "debug.yaml" in msg


def test_file_source_needs_uri():
    with pytest.raises(ConfigError, match="source.uri"):
        load_config("debug", ["data.source.kind=webdataset"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.path=value"):
        load_config("debug", ["data.resolution"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("debug", ["data.resolution.x=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_default_data_uri_follows_run_root():
    cfg = load_config("debug", ["run.root_uri=s3://bucket/runs/x"])
    assert cfg.paths.data == "s3://bucket/runs/x/data"
    assert load_config("debug", ["data.output_uri=/tmp/elsewhere"]).paths.data == "/tmp/elsewhere"
    assert cfg.paths.tokens == "s3://bucket/runs/x/tokens"
    assert cfg.paths.encode_dvae == "s3://bucket/runs/x/dvae/export"


def test_relative_paths_are_pinned_where_the_config_loads(tmp_path, monkeypatch):
    # Train workers and Data tasks run in other directories: a relative path must not follow them.
    monkeypatch.chdir(tmp_path)
    cfg = load_config("debug", ["run.root_uri=runs/demo", "encode.dvae_uri=exports/d", "dvae.output_uri=file:///x"])
    assert cfg.run.root_uri == str(tmp_path / "runs" / "demo")
    assert cfg.paths.data == str(tmp_path / "runs" / "demo" / "data")
    assert cfg.paths.encode_dvae == str(tmp_path / "exports" / "d")
    assert cfg.dvae.output_uri == "file:///x"


def test_prior_precision_choices_are_checked_at_load():
    cfg = load_config("debug")
    assert (cfg.prior.zero_stage == 0 and cfg.prior.precision == "auto"
            and cfg.prior.resblock_grad_scaling is None)
    with pytest.raises(ConfigError, match="fp16 needs use_gpu"):
        load_config("debug", ["prior.precision=fp16"])
    assert load_config("debug", ["prior.precision=fp16", "prior.use_gpu=true"]).prior.precision == "fp16"
    with pytest.raises(ConfigError, match="bf16 needs no loss scaling"):
        load_config("debug", ["prior.precision=bf16", "prior.resblock_grad_scaling=true"])
    assert load_config("debug", ["prior.precision=fp32",
                                 "prior.resblock_grad_scaling=true"]).prior.resblock_grad_scaling
    with pytest.raises(ConfigError, match="prior.caption_dropout"):
        load_config("debug", ["prior.caption_dropout=1.5"])


def test_prior_paths_default_under_the_run_root(tmp_path):
    cfg = load_config("debug", [f"run.root_uri={tmp_path}"])
    assert cfg.paths.prior_tokens == cfg.paths.tokens == f"{tmp_path}/tokens"
    assert cfg.paths.prior == f"{tmp_path}/prior"
    other = load_config("debug", [f"run.root_uri={tmp_path}", "prior.tokens_uri=s3://b/t"])
    assert other.paths.prior_tokens == "s3://b/t"


def test_config_reference_is_generated_from_the_models_and_current():
    from pathlib import Path

    from tessera.config_reference import reference_markdown

    text = reference_markdown()
    # Every leaf field of every section appears under its dotted path.
    for path in ("data.source.shapes.num_samples", "prior.grad_comm.powersgd.rank", "export.output_uri",
                 "reranker.val_pairs", "storage.endpoint_url"):
        assert f"| `{path}` |" in text, path
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == text, "docs/config.md is stale: run `make docs`"


def test_fields_moved_into_shared_sections_are_read_from_their_old_place_with_a_warning():
    """encode/evaluate/generate share ActorPoolConfig ("actors") and SamplingConfig ("sampling");
    a config written before still loads, and says where each field lives now."""
    moved = r"evaluate.num_actors -> evaluate.actors.num_actors.*evaluate.guidance_scale -> evaluate.sampling"
    with pytest.warns(FutureWarning, match=moved):
        cfg = load_config("debug", ["evaluate.guidance_scale=3", "evaluate.num_actors=1"])
    assert cfg.evaluate.sampling.guidance_scale == 3 and cfg.evaluate.actors.num_actors == 1
    assert cfg.evaluate.sampling.candidates == 8  # the rest of the preset's section is kept
    with pytest.warns(FutureWarning, match="encode.batch_size -> encode.actors.batch_size"):
        assert load_config("debug", ["encode.batch_size=64"]).encode.actors.batch_size == 64
    with pytest.raises(ConfigError, match=r"generate: .*sampling\.candidates \(2\) must be at least n \(3\)"):
        load_config("debug", ["generate.n=3", "generate.sampling.candidates=2"])


def test_presets_ship_inside_the_package():
    """`--config debug` must work from an installed wheel: the presets are package data, and the
    checkout's jobs/configs is a link to them, not a second copy."""
    from pathlib import Path

    import tessera
    from tessera.config import CONFIG_DIR

    root = Path(__file__).resolve().parents[1]
    assert CONFIG_DIR == Path(tessera.__file__).resolve().parent / "configs"
    assert ('[tool.setuptools.package-data]\ntessera = ["configs/*.yaml"]'
            in (root / "pyproject.toml").read_text())
    assert {p.name for p in preset_paths()} >= {"debug.yaml", "single_gpu.yaml", "cluster.yaml"}
    assert (root / "jobs" / "configs").resolve() == CONFIG_DIR


@pytest.mark.parametrize("preset", ["single_gpu", "cluster"])
def test_both_stages_train_on_zero3_in_the_gpu_presets(preset):
    """The platform's promise: both training stages (dVAE and prior) run DeepSpeed ZeRO-3."""
    cfg = load_config(preset)
    assert (cfg.dvae.zero_stage, cfg.prior.zero_stage) == (3, 3)


def test_the_cluster_dvae_uses_the_papers_optimizer_and_batch():
    """Paper, appendix A.2: "We used AdamW ... with a weight decay multiplier of 10^-4" and a
    per-GPU batch size of 8, "resulting in a total batch size of 512"."""
    cfg = load_config("cluster")
    d = cfg.dvae
    assert d.weight_decay == 1e-4 and d.micro_batch == 8
    assert d.micro_batch * d.num_workers * d.grad_accum == 512


def test_the_cluster_prior_trains_with_the_papers_bpe_dropout():
    """Paper, appendix B.2: "We also apply 10% BPE dropout when BPE-encoding the captions for
    training." The dVAE's Listing 1 crops are on for the paper-size dVAE (dvae.augment None)."""
    cfg = load_config("cluster")
    assert cfg.loader.bpe_dropout == 0.1 and cfg.dvae.size == "paper" and cfg.dvae.augment is not False


def test_the_cluster_prior_uses_the_papers_method_between_nodes():
    """Paper §2.5: "We also found the warm-start procedure for the Q matrix described in Vogels et
    al. to be unnecessary: we were able to get equivalent results by fixing Q to a random gaussian
    matrix at the start of training, and never updating it." Appendix E: PowerSGD compresses "the
    gradients with respect to all parameters except the embeddings, unembeddings, gains, and
    biases" — between machines, over ZeRO-3 shards within each machine."""
    p = load_config("cluster").prior
    assert (p.zero_stage, p.grad_comm.method, p.grad_comm.powersgd.q_update) == (3, "powersgd", "fixed")
    assert p.grad_comm.powersgd.error_feedback and p.activation_checkpointing
