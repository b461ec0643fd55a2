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


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/generate", {"user_id": "u1", "prompt": "hi", "use_profile": "yes"}, "use_profile"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "use_profile": 1}, "use_profile"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "stream": "true"}, "stream"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "stream": 0}, "stream"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "chat_template": "no"}, "chat_template"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "temperature": "0.5"}, "temperature"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "temperature": True}, "temperature"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "max_tokens": 4.0}, "max_tokens"),
        ("/generate", {"user_id": "u1", "prompt": "hi", "seed": "7"}, "seed"),
        ("/v1/completions", {"prompt": "hi", "stream": "true"}, "stream"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "0"}, "temperature"),
        ("/users/u1/finetune", {"examples": [{"input": "a", "output": "b"}], "add_to_profile": "yes"}, "add_to_profile"),
        ("/users/u1/finetune", {"examples": [{"input": "a", "output": "b"}], "epochs": 1.0}, "epochs"),
    ],
)
def test_wrong_json_types_are_refused_not_coerced(client, path, body, field):
    """The schema says boolean, integer, number, string: a value of another JSON type is a 422
    (it used to be coerced, so `"use_profile": "yes"` got a 200)."""
    assert_error(client.post(path, json=body), 422, field)


def test_json_integers_are_numbers(client):
    """Strict types still take an integer where the schema says number (JSON has one number type)."""
    r = client.post("/generate", json={"user_id": "ints", "prompt": "hi", "temperature": 1, "top_p": 1, "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": "hi", "temperature": 0, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_body_that_is_not_utf8_is_a_400_in_the_envelope(client):
    r = client.post("/generate", content=b'{"user_id": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert_error(r, 400, "parsing the body")


# Every status each operation can answer besides its success; 413 and 500 are every route's.
DOCUMENTED_ERRORS = {
    ("post", "/generate"): {400, 404, 422, 503},
    ("post", "/v1/completions"): {400, 404, 422, 503},
    ("post", "/v1/chat/completions"): {400, 404, 422, 503},
    ("get", "/v1/models"): set(),
    ("put", "/users/{user_id}/profile"): {400, 422, 503},
    ("post", "/users/{user_id}/items"): {400, 409, 422, 503},
    ("get", "/users/{user_id}"): {404, 422, 503},
    ("get", "/users/{user_id}/export"): {404, 422, 503},
    ("delete", "/users/{user_id}"): {404, 422, 503},
    ("post", "/users/{user_id}/finetune"): {400, 404, 409, 422, 429, 503},
    ("get", "/jobs/{job_id}"): {404, 422, 503},
    ("delete", "/users/{user_id}/stacked"): {404, 422, 503},
    ("get", "/admin/bank"): {401, 403},
    ("post", "/admin/bank/reload"): {400, 401, 403, 422},
    ("get", "/healthz"): set(),
    ("get", "/readyz"): {503},
    ("get", "/metrics"): set(),
}


def test_the_openapi_schema_documents_every_status_and_content_type(tmp_path):
    """The contract schemathesis checks against the running server (test_hardening), read here
    without one: every error status in the one envelope, the streams and the Prometheus text."""
    from server.api.app import create_app
    from server.settings import Settings

    spec = create_app(Settings(model_path=tmp_path, bank_path=tmp_path)).openapi()
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    operations = {(method, path): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert operations.keys() == DOCUMENTED_ERRORS.keys()
    for (method, path), op in operations.items():
        responses = {int(status): r for status, r in op["responses"].items()}
        errors = {status for status in responses if status >= 400}
        assert errors == DOCUMENTED_ERRORS[method, path] | {413, 500}, (method, path)
        for status in errors:
            assert responses[status]["content"] == envelope, (method, path, status)
        assert ("security" in op) == path.startswith("/admin/"), (method, path)
        success = [r for status, r in responses.items() if status < 300]
        assert len(success) == 1, (method, path)
        if (method, path) in {("post", "/generate"), ("post", "/v1/completions"), ("post", "/v1/chat/completions")}:
            assert set(success[0]["content"]) == {"application/json", "text/event-stream"}
        json_body = success[0].get("content", {}).get("application/json", {}).get("schema")
        if json_body is not None:  # a named model, not `{}` or a bare object
            assert "$ref" in json_body, (method, path, json_body)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422 body, not ours
    assert set(operations["get", "/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    assert spec["components"]["securitySchemes"]["adminToken"] == {"type": "http", "scheme": "bearer", "description": "MTA_ADMIN_TOKEN"}
