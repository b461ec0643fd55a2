"""OpenAPI links: which calls a response's ids feed next. Clients generated from the schema and
the stateful fuzzing in tests/test_hardening.py follow them (PUT profile -> generate, fine-tune ->
job, ... -> DELETE). Operation ids are the route functions' names (`create_app`)."""

from __future__ import annotations

from typing import Any


def _with_user(operation_id: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": {"user_id": "$response.body#/user_id"}}


USER_LINKS: dict[str, Any] = {
    "links": {
        "GetUser": _with_user("get_user"),
        "ExportUser": _with_user("export_user"),
        "Generate": {
            "operationId": "generate",
            "requestBody": {"user_id": "$response.body#/user_id", "prompt": "Hello", "max_tokens": 4},
        },
        "Finetune": _with_user("finetune"),
        "DeleteStacked": _with_user("delete_stacked"),
        "DeleteUser": _with_user("delete_user"),
    }
}

JOB_LINKS: dict[str, Any] = {
    "links": {"GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/job_id"}}}
}
