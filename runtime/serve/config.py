"""What the HTTP handler and the generation thread share: the server's settings and its counters."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


def served_names(pack: str) -> set[str]:
    """The model ids a request may use for the served pack."""
    p = Path(pack)
    return {p.name, str(p), str(p.resolve()), "default_model"}


@dataclass
class ServerStats:
    """Counters shared by the HTTP threads and the generation thread (``GET /stats``)."""

    max_concurrency: int
    in_flight: int = 0
    admitted: int = 0
    rejected: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    running: dict | None = None
    last: dict | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def admit(self) -> bool:
        with self._lock:
            if self.in_flight >= self.max_concurrency:
                self.rejected += 1
                return False
            self.in_flight += 1
            self.admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def record(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class ServerConfig:
    """What the HTTP handler needs to know besides mlx-lm's options."""

    pack: str
    api_key: str | None = None
    max_context: int = 32768
    num_experts: int = 0
