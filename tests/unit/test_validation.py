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


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "nul\x00", "tab\tx", "esc\x1b", "sep\u2028", "del\x7f"])
def test_control_characters_in_ids_titles_and_users_are_refused(value):
    from gateway.validation import validate_delete, validate_delete_user, validate_upsert
    for request, field in ((pb.UpsertItemsRequest(items=[pb.NewItem(item_id=value, title="t")]), "items[0].item_id"),
                           (pb.UpsertItemsRequest(items=[pb.NewItem(item_id="i", title=value)]), "items[0].title"),
                           (pb.UpsertItemsRequest(items=[pb.NewItem(item_id="i", title="t", category=value)]),
                            "items[0].category")):
        with pytest.raises(InvalidArgument) as info:
            validate_upsert(request)
        assert str(info.value).startswith(f"{field}: must not contain")
    with pytest.raises(InvalidArgument, match=r"^item_ids\[0\]: must not contain"):
        validate_delete(pb.DeleteItemsRequest(item_ids=[value]))
    with pytest.raises(InvalidArgument, match=r"^user_id: must not contain"):
        validate_delete_user(pb.DeleteUserDataRequest(user_id=value))


def test_item_text_keeps_line_breaks_but_not_nul():
    from gateway.validation import validate_upsert
    assert validate_upsert(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="i", title="t", text="a\n\tb")]))[0].text == "a\n\tb"
    with pytest.raises(InvalidArgument, match=r"^items\[0\]\.text: must not contain NUL"):
        validate_upsert(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="i", title="t", text="a\x00")]))


def test_delete_ids_are_deduplicated_and_bounded():
    from gateway.validation import validate_delete
    assert validate_delete(pb.DeleteItemsRequest(item_ids=["a", "b", "a"])) == ["a", "b"]
    with pytest.raises(InvalidArgument, match=r"^item_ids\[1\]: item ids must be 1..256"):
        validate_delete(pb.DeleteItemsRequest(item_ids=["a", ""]))
