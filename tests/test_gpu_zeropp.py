"""ZeRO++ with its quantized parts (qwZ weights, qgZ gradients) on one CUDA GPU, a few steps of
the prior's worker loop in this process (no Ray: the GPU image has none). DeepSpeed's quantizer
kernels are CUDA-only, which is why CPU configs refuse these switches."""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu


class InProcessHooks:
    """The loop's hooks in one process: synthetic learnable rows, reports kept in a list."""

    def __init__(self, cfg, tmp_path):
        from test_train_prior import MANIFEST

        self.cfg, self.manifest, self.reports, self.tmp = cfg, MANIFEST, [], tmp_path

    def batches(self, epoch):
        from test_train_prior import synthetic_rows

        step = epoch
        while True:
            rows = synthetic_rows(step * 1000, self.cfg.prior.micro_batch, text_len=self.cfg.loader.text_len)
            yield {k: rows[k] for k in ("text_ids", "text_mask", "image_tokens")}
            step += 1

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))

    def latest_checkpoint(self):
        return None

    def token_manifest(self):
        return self.manifest

    def validation_rows(self):
        return None

    def image_decoder(self):
        return None

    def save_artifact(self, name, data):
        (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / name).write_bytes(data)


def test_zeropp_quantized_weights_and_gradients_on_one_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("deepspeed")
    from tessera.config import load_config
    from tessera.training.prior_loop import train_prior

    cfg = load_config("debug", ["prior.use_gpu=true", "prior.precision=bf16", "prior.grad_comm.method=zeropp",
                                "prior.zero_stage=3",
                                "prior.grad_comm.zeropp.quantized_weights=true",
                                "prior.grad_comm.zeropp.quantized_gradients=true", "loader.text_len=6",
                                "prior.micro_batch=8", "prior.steps=4", "prior.report_every=1",
                                "prior.checkpoint_every=100", "prior.warmup_steps=1"])
    hooks = InProcessHooks(cfg, tmp_path)
    train_prior(cfg, hooks)
    assert [m["step"] for m in hooks.reports] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in hooks.reports)
