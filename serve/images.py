"""The store behind `response_format=url`.

The store lives in the ingress replica's memory: ids are unguessable (128 random bits), so a URL
works as a capability (a browser's <img> cannot send a Bearer key), and entries leave when they are
older than the TTL or, oldest first, when the total size passes the byte bound.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict


class ImageStore:
    def __init__(self, *, max_bytes: int, ttl_s: float, clock=time.monotonic):
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        image_id = secrets.token_urlsafe(16)
        with self._lock:
            self._items[image_id] = (self._clock(), png)
            self._bytes += len(png)
            self._evict()
        return image_id

    def get(self, image_id: str) -> bytes | None:
        with self._lock:
            self._evict()
            item = self._items.get(image_id)
            return None if item is None else item[1]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _evict(self) -> None:
        now = self._clock()
        # Insertion order is creation order, so expired entries are always at the head.
        while self._items:
            image_id, (created, png) = next(iter(self._items.items()))
            if now - created <= self.ttl_s:
                break
            self._drop(image_id)
        while self._bytes > self.max_bytes and self._items:
            self._drop(next(iter(self._items)))

    def _drop(self, image_id: str) -> None:
        _, png = self._items.pop(image_id)
        self._bytes -= len(png)
