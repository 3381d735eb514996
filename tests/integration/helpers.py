"""Shared helpers for integration tests."""
from __future__ import annotations

import threading
import time
from collections import Counter

import grpc

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


class Load(threading.Thread):
    """A steady trickle of requests on `channel` (e.g. stack.gateway_channel(); closed by stop());
    records every outcome."""

    def __init__(self, channel: grpc.Channel, user: str, deadline_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        if isinstance(channel, str):
            raise TypeError("Load takes a channel (stack.gateway_channel()), not an address: TLS + tokens are on")
        self.channel = channel
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


def upsert(stub: pb_grpc.RecommenderStub, ids: list[str], text: str, category: str = "Drama",
           title: str = "Under the Ice") -> pb.UpsertItemsResponse:
    return stub.UpsertItems(pb.UpsertItemsRequest(items=[
        pb.NewItem(item_id=i, title=title, text=text, category=category) for i in ids]), timeout=10)


def bert_top(stack, name: str, history: list[int], n: int, min_seq: int = 0) -> set[int]:
    """The internal indices the BERT channel ranks 1..n for a history (asked of one retrieval
    replica `name`, over the stack's operator channel)."""
    with stack.channel(name) as ch:
        reply = pb_grpc.RetrievalStub(ch).Retrieve(pb.RetrieveRequest(history=history, min_item_log_seq=min_seq),
                                                   timeout=10)
    bert = next(c for c in reply.candidates.channels if c.channel == "bert")
    return {item for item, rank in zip(reply.candidates.items, bert.ranks) if 1 <= rank <= n}


def service_status(stack, name: str) -> pb.ServiceStatus:
    """Status of one retrieval or ranking process (`retrieval`, `ranking-1`, ...)."""
    stub_class = pb_grpc.RetrievalStub if name.startswith("retrieval") else pb_grpc.RankingStub
    with stack.channel(name) as ch:
        return stub_class(ch).Status(pb.StatusRequest(), timeout=5)


def rank(stack, name: str, history: list[int], items: list[int], min_seq: int = 0) -> pb.RankResponse:
    """Rank exactly `items` (as if retrieval had proposed them by BERT) on one ranking replica."""
    column = pb.ChannelColumn(channel="bert", scores=[1.0 - 0.001 * j for j in range(len(items))],
                              ranks=list(range(1, len(items) + 1)))
    with stack.channel(name) as ch:
        return pb_grpc.RankingStub(ch).Rank(pb.RankRequest(
            history=history, candidates=pb.Candidates(items=items, channels=[column]), k=len(items),
            min_item_log_seq=min_seq), timeout=10)


def click(user: str, item: str) -> pb.EventBatch:
    return pb.EventBatch(events=[pb.Event(user_id=user, item_id=item, type="click", timestamp=time.time() - 5)])


def code_of(call, *args, **kwargs) -> str:
    """The status code name of one call ('OK' when it succeeds)."""
    try:
        call(*args, **kwargs)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
