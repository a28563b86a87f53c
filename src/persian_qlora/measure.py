"""Wall time and peak memory of one phase of work (load, train, generate), measured the same way everywhere.

The meter measures the device the phase runs on. A CUDA device: its ``max_memory_allocated`` /
``max_memory_reserved``, reset when the phase starts. Any other device (the CPU): the process's resident set size
sampled every 10 ms by a background thread, whose maximum is the phase's peak. (``ru_maxrss`` cannot be reset, so
it cannot give a per-phase peak.) A CPU peak includes memory the process already held when the phase began, which
is recorded too as ``rss_at_start_gb``. The result names the device.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

__all__ = ["PhaseMeter", "PhaseResult"]


@dataclass
class PhaseResult:
    seconds: float = 0.0
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_gb(self) -> float:
        """The headline peak: CUDA max allocated on a GPU, sampled peak RSS on CPU."""
        return self.memory.get("cuda_max_allocated_gb", self.memory.get("cpu_peak_rss_gb", 0.0))


class PhaseMeter:
    """``with PhaseMeter(device) as meter: ...`` then ``meter.result`` holds seconds and peak memory on ``device``
    (e.g. ``model.device``; a ``torch.device`` or its name)."""

    def __init__(self, device: torch.device | str, interval: float = 0.01) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.interval = interval
        self.result = PhaseResult()
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._peak_rss = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PhaseMeter:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss_at_start = self._peak_rss = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self.result.seconds = time.perf_counter() - self._started
        if self._cuda:
            self.result.memory = {
                "device": f"{self.device} ({torch.cuda.get_device_name(self.device)})",
                "cuda_max_allocated_gb": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "cuda_max_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 2**30,
            }
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
            self.result.memory = {
                "device": str(self.device),
                "cpu_peak_rss_gb": self._peak_rss / 2**30,
                "rss_at_start_gb": self._rss_at_start / 2**30,
                "note": "process resident memory, sampled every 10 ms during the phase",
            }
