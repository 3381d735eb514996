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


# ---------------------------------------------------------------- strict input (issue 13, part 4)

def test_the_control_character_rule_is_unicode_category_cc_plus_the_separators():
    import unicodedata

    from core.text_rules import has_control
    for code in [*range(0x3000), 0xFEFF, 0x1F600, 0x10FFFF]:
        c = chr(code)
        cc = unicodedata.category(c) == "Cc"
        assert has_control(c) == (cc or c in "\u2028\u2029"), hex(code)
        assert has_control(c, allow_breaks=True) == (cc and c not in "\t\n\r"), hex(code)
    assert not has_control("Amélie (2001) – a film  with spaces")


@pytest.mark.parametrize("request_kwargs, field", [
    ({"user_id": "u\x00"}, "user_id"),
    ({"user_id": "u\n"}, "user_id"),
    ({"exclude_item_ids": ["a", "b", "c\x1f"]}, "exclude_item_ids[2]"),
    ({"history_item_ids": ["a\u2028"]}, "history_item_ids[0]"),
    ({"surface": "home\r"}, "surface"),
    ({"request_id": "r\x7f"}, "request_id"),
])
def test_recommend_refuses_control_characters_by_field(request_kwargs, field):
    from core.text_rules import NO_CONTROLS
    with pytest.raises(InvalidArgument) as info:
        validate_recommend(pb.RecommendRequest(**{"user_id": "u", "k": 5, **request_kwargs}))
    assert str(info.value) == f"{field}: {NO_CONTROLS}"


@pytest.mark.parametrize("change, message", [
    ({"value": float("nan")}, "events[4].value: must be a finite number"),
    ({"value": float("-inf")}, "events[4].value: must be a finite number"),
    ({"timestamp": float("inf")}, "events[4].timestamp: must be a finite number"),
    ({"user_id": "u\x00"}, "events[4].user_id: must not contain control characters"),
    ({"item_id": "i\n"}, "events[4].item_id: must not contain control characters"),
])
def test_event_fields_are_checked_before_anything_else(change, message):
    import dataclasses

    from gateway.event_log import Event
    from gateway.validation import check_event_fields
    good = Event("u", "i", "click", 1.7e9, 1.0)
    check_event_fields(4, good)
    with pytest.raises(InvalidArgument) as info:
        check_event_fields(4, dataclasses.replace(good, **change))
    assert str(info.value).startswith(message)


def test_id_lists_name_the_first_bad_index_and_never_the_value():
    from core.text_rules import finite_error, plain_ids_error
    assert plain_ids_error("ids", ["a"] * 5000) is None
    assert plain_ids_error("ids", ["a"] * 5000 + ["secret\x00"]) == \
        "ids[5000]: must not contain control characters, NUL or line breaks"
    assert finite_error("weights", [1.0, 2.0]) is None
    assert finite_error("weights", [1.0, float("nan")]).startswith("weights[1]: must be a finite number")
