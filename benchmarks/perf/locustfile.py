"""Locust user for POST /recommend: each simulated shopper sends the recorded request mix back to back.

The mix (``PERF_MIX``: a JSON list of request bodies) is written by ``benchmarks.perf.recommend``;
users start at different offsets so they do not send the same body at the same moment.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from locust import FastHttpUser, constant, task

MIX = json.loads(Path(os.environ["PERF_MIX"]).read_text())
_offsets = itertools.count()


class Shopper(FastHttpUser):
    """A closed-loop client: the next request leaves when the previous answer is in."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.i = (next(_offsets) * 37) % len(MIX)

    @task
    def recommend(self) -> None:
        body = MIX[self.i % len(MIX)]
        self.i += 1
        self.client.post("/recommend", json=body, name="/recommend")
