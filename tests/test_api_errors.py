"""Bad input gets a 4xx with a message in one envelope; never a 500 or a hang."""

from __future__ import annotations

import pytest

GOOD_ITEMS = [{"description": "A robot learns to love.", "tag": "sci-fi"}]


def assert_error(r, status: int, *fragments: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    for f in fragments:
        assert f.lower() in err["message"].lower(), err["message"]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"prompt": "hi"}, 422, "user_id"),
        ({"user_id": "", "prompt": "hi"}, 422, "user_id"),
        ({"user_id": "bad id!", "prompt": "hi"}, 422, "user_id"),
        ({"user_id": "x" * 200, "prompt": "hi"}, 422, "user_id"),
        ({"user_id": 42, "prompt": "hi"}, 422, "user_id"),
        ({"user_id": "u1"}, 422, "exactly one"),
        ({"user_id": "u1", "prompt": "   "}, 422, "empty"),
        ({"user_id": "u1", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 422, "exactly one"),
        ({"user_id": "u1", "messages": []}, 422, "messages"),
        ({"user_id": "u1", "messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
        ({"user_id": "u1", "prompt": "hi", "colour": "red"}, 422, "colour"),
        ({"user_id": "u1", "prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ({"user_id": "u1", "prompt": "hi", "max_tokens": 10_000}, 422, "max_tokens"),
        ({"user_id": "u1", "prompt": "hi", "min_tokens": -1}, 422, "min_tokens"),
        ({"user_id": "u1", "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 422, "min_tokens 5 > max_tokens 4"),
        ({"user_id": "u1", "prompt": "hi", "temperature": -1}, 422, "temperature"),
        ({"user_id": "u1", "prompt": "hi", "top_p": 0}, 422, "top_p"),
        ({"user_id": "u1", "prompt": "word " * 10_000}, 422, "max_prompt_chars"),
        ({"user_id": "u1", "prompt": "word " * 600, "max_tokens": 16}, 422, "max_model_len"),
    ],
)
def test_generate_bad_input(client, body, status, fragment):
    assert_error(client.post("/generate", json=body), status, fragment)


def test_streaming_bad_input_is_a_4xx_not_a_broken_stream(client):
    r = client.post("/generate", json={"user_id": "u1", "prompt": "word " * 600, "stream": True})
    assert_error(r, 422, "max_model_len")


def test_malformed_json_and_wrong_types(client):
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422)
    assert_error(client.post("/generate", json=["a", "list"]), 422)


def test_oversized_body_is_refused(client):
    big = {"items": [{"text": "x" * 1_000_000}] * 5}
    assert_error(client.put("/users/big/profile", json=big), 413, "bytes")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"items": []}, "at least one"),
        ({}, "items"),
        ({"items": [{"description": "", "tag": None}]}, "no non-empty text"),
        ({"items": [{"description": {"nested": "object"}}]}, "items"),
        ({"items": ["just a string"]}, "items"),
        ({"items": [{"text": "t"}] * 21}, "max_profile_items"),
        ({"items": [{"text": "y" * 30_000}]}, "max_item_chars"),
        ({"items": GOOD_ITEMS, "extra": 1}, "extra"),
    ],
)
def test_profile_bad_input(client, body, fragment):
    assert_error(client.put("/users/u-bad/profile", json=body), 422, fragment)
    assert client.get("/users/u-bad").status_code == 404  # nothing half-written


def test_bad_user_ids_in_paths(client):
    assert_error(client.get("/users/bad%20id"), 422, "user_id")
    assert_error(client.put("/users/-leading/profile", json={"items": GOOD_ITEMS}), 422, "user_id")
    assert_error(client.get("/users/nobody-here"), 404, "not found")
    assert_error(client.delete("/users/nobody-here"), 404, "not found")


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/generate"), 405)


def test_openai_bad_input(client):
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 422, "messages")
    assert_error(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 422, "one prompt")
    assert_error(client.post("/v1/completions", json={"prompt": "hi", "n": 2}), 422, "n")
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "user": "no spaces allowed"}), 422, "user")
