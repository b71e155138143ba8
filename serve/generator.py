"""The model deployment: loads one bundle per replica and generates images in batches.

It only holds loaded state; the sampling math is `tessera.sampling.generate.ImageGenerator`'s.
Autoscaling, replica resources and admission limits are set in `serve.app.build_app`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from tessera.viz import png_bytes

log = logging.getLogger("ray.serve")


@serve.deployment(name="ImageGenerator")
class ImageGeneratorDeployment:
    def __init__(self, bundle_uri: str, *, device: str, num_cpus: float, max_batch_size: int,
                 batch_wait_timeout_s: float, max_candidates: int = 16):
        import torch

        from tessera.bundle import load_bundle
        from tessera.sampling.generate import ImageGenerator

        if device == "cpu":
            # Ray reserves num_cpus for this replica, but torch would start one thread per core and
            # replicas sharing a node would fight over them.
            torch.set_num_threads(max(1, int(num_cpus)))
        t0 = time.perf_counter()
        self.bundle = load_bundle(bundle_uri, device=device)
        self.generator = ImageGenerator(self.bundle, device=device)
        self.max_candidates = max_candidates
        # serve.batch's limits are fixed where the class is defined; its documented setters apply
        # the application's arguments.
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("loaded bundle %s (%s, %d px) in %.1f s", bundle_uri, self.bundle.name,
                 self.generator.resolution, time.perf_counter() - t0)

    async def generate(self, job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        """One request (prompt, GenerationParams fields) -> {"images": [PNG bytes] * n} or
        {"error": message} for parameters the model refuses (the ingress checks them first)."""
        work = asyncio.ensure_future(self._generate_batch(job))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The caller gave up (timeout, disconnect), but the batch this job joined runs on. Keep
            # this request's slot until it ends, so max_ongoing_requests, the queue bound and the
            # autoscaler all count the work the replica is really doing.
            await asyncio.wait([work])
            raise

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, jobs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        # Sampling holds the CPU/GPU for a while: off the event loop, so the replica keeps
        # accepting requests into the next batch and answering health checks meanwhile.
        return await asyncio.to_thread(self._run, jobs)

    def _run(self, jobs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        from tessera.sampling.generate import GenerationParams

        t0 = time.perf_counter()
        out: list[dict[str, Any]] = [{} for _ in jobs]
        valid = []
        for i, (prompt, fields) in enumerate(jobs):
            # One bad job must not fail the others that share its batch.
            try:
                params = GenerationParams(**fields)
                self.generator.check(params, max_candidates=self.max_candidates)
                valid.append((i, (prompt, params)))
            except (TypeError, ValueError) as e:
                out[i] = {"error": str(e)}
        if valid:
            images = self.generator.generate([job for _, job in valid])
            for (i, _), per_job in zip(valid, images, strict=True):
                out[i] = {"images": [png_bytes(img) for img in per_job]}
        log.info("generated %d images for %d requests in %.2f s", sum(len(o.get("images", ())) for o in out),
                 len(valid), time.perf_counter() - t0)
        return out
