"""Shared helpers for integration tests."""
from __future__ import annotations

import threading
import time
from collections import Counter

import grpc

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


class Load(threading.Thread):
    """A steady trickle of requests; records every outcome."""

    def __init__(self, target: str, user: str, deadline_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.user = user
        self.deadline_s = deadline_s
        self.slowest_s = 0.0
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.short: int = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            try:
                r = self.stub.Recommend(pb.RecommendRequest(user_id=self.user, k=10), timeout=self.deadline_s)
                self.outcomes["OK"] += 1
                self.reasons.update(r.degraded_reasons)
                self.short += len(r.items) != 10
            except grpc.RpcError as e:
                self.outcomes[e.code().name] += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)
        self.channel.close()
