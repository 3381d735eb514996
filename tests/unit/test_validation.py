import pytest

from core.limits import MAX_EXCLUDE
from gateway.validation import InvalidArgument, validate_recommend
from protos import fusionrec_pb2 as pb


@pytest.mark.parametrize("request_kwargs, field, limit", [
    ({"user_id": "u", "k": 0}, "k", "1..100"),
    ({"user_id": "u", "k": 101}, "k", "1..100"),
    ({"user_id": "", "k": 5}, "user_id", "history_item_ids"),
    ({"user_id": "x" * 10_000, "k": 5}, "user_id", "256"),
    ({"user_id": "u", "k": 5, "exclude_item_ids": [str(i) for i in range(100_000)]}, "exclude_item_ids", str(MAX_EXCLUDE)),
    ({"user_id": "u", "k": 5, "history_item_ids": [str(i) for i in range(1001)]}, "history_item_ids", "1000"),
    ({"user_id": "u", "k": 5, "exclude_item_ids": [""]}, "exclude_item_ids[0]", "256"),
    ({"user_id": "u", "k": 5, "surface": "s" * 65}, "surface", "64"),
    ({"user_id": "u", "k": 5, "request_id": "r" * 129}, "request_id", "128"),
])
def test_bad_input_names_field_and_limit(request_kwargs, field, limit):
    with pytest.raises(InvalidArgument) as info:
        validate_recommend(pb.RecommendRequest(**request_kwargs))
    assert str(info.value).startswith(field)
    assert limit in str(info.value)


def test_valid_request_gets_a_request_id():
    q = validate_recommend(pb.RecommendRequest(user_id="", history_item_ids=["1"], k=3))
    assert q.k == 3 and q.history_item_ids == ("1",) and len(q.request_id) == 32
    assert validate_recommend(pb.RecommendRequest(user_id="u", k=1, request_id="abc")).request_id == "abc"
