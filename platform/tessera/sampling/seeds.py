"""The seed rule every sampler caller shares (the HTTP API, batch generation, evaluation).
numpy only, so a job's driver can seed captions without importing torch.

A job seeded s draws its candidate j with seed s·1000 + j: distinct streams per candidate, and the
same image for the same (prompt, options, seed) whatever else shares the batch. Batch jobs seed
caption i of a run seeded `base` with caption_seed(base, i), so an image depends on its caption,
its index and the settings only, never on batching or actor placement.
"""

from __future__ import annotations

import numpy as np

MAX_SEED = 2**31 - 1
# Candidate seeds are s·1000 + j, so j stays below 1000; 512 is what the DALL·E paper reranked.
# Callers (the Serve app, generate jobs) pass their own lower limits.
MAX_CANDIDATES = 512


def candidate_seeds(seeds: list[int], candidates: int) -> list[int]:
    """Per job seed s, the seeds of its `candidates` draws, job-major: s·1000 + j."""
    return [int(s) * 1000 + j for s in seeds for j in range(candidates)]


def caption_seed(base: int, index: int, stream: int = 0) -> int:
    """The seed of caption `index` in a run seeded `base` (a hash: neighbouring bases do not
    share images); `stream` separates caption lists of one run (evaluation's val and held-out)."""
    state = np.random.SeedSequence([int(base), int(stream), int(index)]).generate_state(1)[0]
    return int(state) % (MAX_SEED + 1)
