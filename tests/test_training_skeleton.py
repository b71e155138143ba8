"""The shared training loop (tessera.training.skeleton) with gradient accumulation, for each
stage, in one process with a real DeepSpeed engine (a process group of one on gloo).

With grad_accum 2, every optimizer step consumes two micro-batches; a report covers report_every
optimizer steps, so its loss is the mean over report_every × grad_accum micro-batches and its
samples/s counts the samples of every one of them. The counts here are written out by hand from
the settings, and the losses are the ones each micro-batch's forward pass returned."""

import os

import numpy as np
import pytest
import torch

from tessera.config import load_config
from tessera.training.dvae_loop import DVAEStage
from tessera.training.prior_loop import PriorStage
from tessera.training.reranker_loop import RerankerStage

MICRO, ACCUM, REPORT_EVERY, STEPS = 3, 2, 2, 4
TEXT_LEN, VOCAB = 6, 40
TOKENS = {"kind": "synthetic", "text_vocab_size": VOCAB, "num_image_tokens": 16, "grid_size": 3}


@pytest.fixture
def one_process_group():
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups
    os.environ.clear()
    os.environ.update(saved)


class CountingIO:
    """Deterministic batches; every report kept. No validation data, nothing to resume."""

    def __init__(self, kind: str):
        self.kind, self.reports = kind, []

    def batches(self, epoch: int):
        g = np.random.default_rng(epoch)
        while True:
            ids = g.integers(1, VOCAB, size=(MICRO, TEXT_LEN)).astype(np.int32)
            mask = np.ones((MICRO, TEXT_LEN), bool)
            if self.kind == "prior":
                image = g.integers(0, TOKENS["num_image_tokens"], size=(MICRO, 9)).astype(np.int16)
                yield {"text_ids": ids, "text_mask": mask, "image_tokens": image}
            else:
                image = torch.from_numpy(g.integers(0, 256, size=(MICRO, 32, 32, 3), dtype=np.uint8))
                yield {"image": image, "text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask)}

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))

    def latest_checkpoint(self):
        return None

    def save_artifact(self, name, data):
        pass

    def data_manifest(self):
        return {"tokenizer": {"vocab_size": VOCAB}}

    def token_manifest(self):
        return TOKENS

    def validation_images(self):
        return None

    def validation_pairs(self):
        return None

    def validation_rows(self):
        return None

    def image_decoder(self):
        return None


def recording(stage_class):
    """The stage as it is, keeping every micro-batch's (step, values, samples)."""

    class Recording(stage_class):
        micro: list

        def forward_backward(self, batch, *, step, seed):
            values, samples = super().forward_backward(batch, step=step, seed=seed)
            self.micro = getattr(self, "micro", []) + [(step, values, samples)]
            return values, samples

    return Recording


COMMON = [f"loader.text_len={TEXT_LEN}"]
CASES = {
    "dvae": (DVAEStage, ["dvae.num_tokens=64"]),
    "prior": (PriorStage, ["prior.dim=32", "prior.depth=2", "prior.heads=4", "prior.zero_stage=3"]),
    "reranker": (RerankerStage, []),
}


@pytest.mark.parametrize("section", sorted(CASES))
def test_accumulated_steps_report_every_micro_batch(section, one_process_group, tmp_path):
    stage_class, extra = CASES[section]
    s = section
    cfg = load_config("debug", COMMON + extra + [
        f"run.root_uri={tmp_path}", f"{s}.micro_batch={MICRO}", f"{s}.grad_accum={ACCUM}",
        f"{s}.steps={STEPS}",
        f"{s}.report_every={REPORT_EVERY}", f"{s}.eval_every=1000", f"{s}.checkpoint_every=1000",
        f"{s}.warmup_steps=1", f"{s}.threads_per_worker=1"])
    io = CountingIO(section)
    stage = recording(stage_class)(cfg, io)
    last = stage.run()

    assert torch.get_num_threads() == 1  # threads_per_worker (conftest restores the count)

    assert [m["step"] for m in io.reports] == [2, 4]
    assert len(stage.micro) == STEPS * ACCUM == 8  # micro-batches the 4 optimizer steps consumed
    assert stage.engine.global_steps == STEPS
    per_report = REPORT_EVERY * ACCUM  # 4 micro-batches of 3 samples
    for k, m in enumerate(io.reports):
        window = stage.micro[k * per_report:(k + 1) * per_report]
        assert {step for step, _, _ in window} == {2 * k, 2 * k + 1}
        assert m["micro_batches"] == per_report == 4
        assert m["samples"] == per_report * MICRO == 12
        assert m["samples_per_s"] == pytest.approx(m["samples"] / m["window_s"])
        assert m["loss"] == pytest.approx(np.mean([v["loss"] for _, v, _ in window]), rel=1e-12)
    assert last == io.reports[-1]
    if section == "prior":  # tokens per sequence: 6 caption + 3 × 3 image tokens
        assert last["tokens_per_s"] == pytest.approx(last["samples_per_s"] * (TEXT_LEN + 9))


def test_ray_train_keeps_the_configured_number_of_checkpoints(tmp_path):
    from tessera.config import ConfigError
    from tessera.training.ray_io import run_config

    cfg = load_config("debug", [f"run.root_uri={tmp_path}"])
    rc = run_config(cfg, "prior")
    assert rc.checkpoint_config.num_to_keep == 2 and rc.name == f"{cfg.run.name}-prior"
    assert rc.storage_path == str(tmp_path / "prior")
    assert run_config(load_config("debug", [f"run.root_uri={tmp_path}", "dvae.keep_checkpoints=null"]),
                      "dvae").checkpoint_config.num_to_keep is None  # every one, when asked
    with pytest.raises(ConfigError, match="reranker.keep_checkpoints"):
        load_config("debug", ["reranker.keep_checkpoints=0"])
