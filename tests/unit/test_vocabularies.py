"""One declaration each: degraded reasons (core enum = proto enum), event types, channel names,
limits (core/limits.py only)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common.metrics import DEGRADED_REASONS, record_degraded
from common.wire import PREFIX, reason_to_proto, reasons_from_proto, reasons_to_proto
from core.channel_names import CHANNEL_NAMES
from core.events import EVENT_TYPES, HISTORY_TYPES, EventType
from core.features import CHANNELS
from core.reasons import PRODUCED, DegradedReason
from protos import fusionrec_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def test_core_reasons_are_the_proto_enum():
    proto = {name.removeprefix(PREFIX): number for name, number in pb.DegradedReason.items()}
    assert all(name.startswith(PREFIX) for name in pb.DegradedReason.keys())
    assert set(proto) == {r.name for r in DegradedReason}
    assert proto["UNSPECIFIED"] == 0
    assert all(r.value == r.name.lower() for r in DegradedReason)   # the string form


def test_reasons_round_trip_and_unknown_numbers_read_unspecified():
    assert reasons_from_proto(reasons_to_proto(list(DegradedReason))) == list(DegradedReason)
    assert reason_to_proto(DegradedReason.RANKING_TIMEOUT) == pb.DEGRADED_REASON_RANKING_TIMEOUT
    assert reasons_from_proto([999, pb.DEGRADED_REASON_NO_CANDIDATES]) == [
        DegradedReason.UNSPECIFIED, DegradedReason.NO_CANDIDATES]


def test_metric_vocabulary_derives_from_the_enum():
    assert DEGRADED_REASONS == {r.value for r in PRODUCED} | {"other"}
    assert "unspecified" not in DEGRADED_REASONS and "ranking_timeout" in DEGRADED_REASONS
    from prometheus_client import REGISTRY

    def count(reason: str) -> float:
        return REGISTRY.get_sample_value("fusionrec_degraded_total", {"service": "t", "reason": reason}) or 0.0
    before_enum, before_other = count("reranker_error"), count("other")
    record_degraded("t", DegradedReason.RERANKER_ERROR)
    record_degraded("t", "not-a-reason")
    assert count("reranker_error") == before_enum + 1 and count("other") == before_other + 1


def test_event_types_and_channel_names():
    assert EVENT_TYPES == ("impression", "click", "purchase", "add_to_cart", "like")
    assert HISTORY_TYPES == set(EVENT_TYPES) - {EventType.IMPRESSION}
    assert "impression | click | purchase | add_to_cart | like" in (REPO / "protos" / "fusionrec.proto").read_text()
    assert CHANNEL_NAMES == tuple(CHANNELS) == ("bert", "cf", "popular", "item2item", "sequential")


SERVICE_MODULES = sorted([*(REPO / "gateway").glob("*.py"), *(REPO / "ranking").glob("*.py")])


@pytest.mark.parametrize("path", SERVICE_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_service_modules_declare_no_limits_of_their_own(path):
    """Every MAX_* comes from core/limits.py (the proto and the INVALID_ARGUMENT messages name them)."""
    tree = ast.parse(path.read_text())
    own = [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
           for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
           if isinstance(t, ast.Name) and t.id.startswith("MAX_")]
    assert own == [], f"{path.name}: {own} belong in core/limits.py"


def test_versions_comment_names_the_keys_the_gateway_writes():
    proto = (REPO / "protos" / "fusionrec.proto").read_text()
    comment = proto[proto.index("message RecommendResponse"):proto.index("map<string, string> versions")]
    for key in ("artifacts", "index", "fused_ranker"):
        assert f'"{key}"' in comment
    assert "reranker" not in comment
