"""The model deployment: loads one bundle per replica and generates images in batches.

It only holds loaded state; the sampling math is `tessera.sampling.generate.ImageGenerator`'s.
Autoscaling, replica resources and admission limits are set in `serve.app.build_app`.

Each replica serves exactly the bundle the application was built with: build_app pins the digest of
the bundle's manifest (which lists every file's sha256), and a replica started later (autoscaling,
a restart) whose bundle URI now holds other weights refuses to start instead of serving them under
the same model name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any

from ray import serve

from tessera.viz import png_bytes

log = logging.getLogger("ray.serve")


def manifest_digest(manifest: dict) -> str:
    """sha256 of a bundle manifest's content (canonical JSON, so independent of its formatting)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_pinned(manifest: dict, *, uri: str, pinned: str) -> None:
    got = manifest_digest(manifest)
    if got != pinned:
        message = (f"refusing to serve bundle {uri}: its manifest has sha256 {got[:16]}, but this "
                   f"application was built with {pinned[:16]} (model '{manifest.get('name')}'); the bundle "
                   "was overwritten since. Redeploy the application to serve the new bundle, or export "
                   "new bundles to new URIs.")
        log.error(message)
        raise RuntimeError(message)


@serve.deployment(name="ImageGenerator")
class ImageGeneratorDeployment:
    def __init__(self, bundle_uri: str, *, manifest_sha256: str, device: str, num_cpus: float,
                 max_batch_size: int, batch_wait_timeout_s: float, max_candidates: int = 16):
        import torch
        from ray.serve.metrics import Counter

        from tessera.bundle import load_bundle, read_manifest
        from tessera.sampling.generate import ImageGenerator

        if device == "cpu":
            # Ray reserves num_cpus for this replica, but torch would start one thread per core and
            # replicas sharing a node would fight over them.
            torch.set_num_threads(max(1, int(num_cpus)))
        t0 = time.perf_counter()
        # Checked before loading (cheap: no weights read for a bundle that will be refused) and
        # after, on the manifest load_bundle verified every file against, as the URI may change between.
        check_pinned(read_manifest(bundle_uri), uri=bundle_uri, pinned=manifest_sha256)
        self.bundle = load_bundle(bundle_uri, device=device)
        check_pinned(self.bundle.manifest, uri=bundle_uri, pinned=manifest_sha256)
        self.generator = ImageGenerator(self.bundle, device=device)
        self.max_candidates = max_candidates
        # serve.batch's limits are fixed where the class is defined; its documented setters apply
        # the application's arguments.
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # Ray's metrics API (Serve adds application/deployment/replica tags), exported on each
        # node's Prometheus endpoint.
        self.images_generated = Counter("tessera_images_generated", description="images returned to callers")
        self.candidates_drawn = Counter("tessera_candidates_drawn",
                                        description="images sampled, reranked-away candidates included")
        log.info("loaded bundle %s (%s, %d px, manifest sha256 %s) in %.1f s", bundle_uri, self.bundle.name,
                 self.generator.resolution, manifest_sha256[:16], time.perf_counter() - t0)

    async def generate(self, job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        """One request (prompt, GenerationParams fields; with `image`, an edit primed by that (S, S, 3)
        uint8 array) -> {"images": [PNG bytes] * n} or {"error": message} for parameters the model
        refuses (the ingress checks them first)."""
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
            self.images_generated.inc(sum(len(per_job) for per_job in images))
            self.candidates_drawn.inc(sum(params.draws for _, (_, params) in valid))
        log.info("generated %d images for %d requests in %.2f s", sum(len(o.get("images", ())) for o in out),
                 len(valid), time.perf_counter() - t0)
        return out
