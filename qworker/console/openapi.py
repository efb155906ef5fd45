"""The OpenAPI 3.1 description of the console's JSON API (served at ``/api/openapi.json``).

Written by hand, next to :mod:`qworker.console.api`: Starlette does not generate one,
and a test checks that every API route is described here and nothing else.
"""

from __future__ import annotations

from typing import Any

from qworker.dlq.filters import NAMES

_ERROR = {
    "description": "An error a person can act on",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}}}
        }
    },
}
_ERRORS = {str(status): _ERROR for status in (400, 401, 403, 404, 409, 503)}
_DLQ = {"name": "dlq", "in": "path", "required": True, "schema": {"type": "string"}}
_MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}}
_FILTER_NAMES = NAMES
_FILTER_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
    for name in _FILTER_NAMES
]
_FILTER = {
    "type": "object",
    "description": "The CLI's filter options with underscores; unset or empty means any.",
    "properties": {name: {"type": "string"} for name in _FILTER_NAMES},
    "additionalProperties": False,
}
_RECORD = {
    "type": "object",
    "description": "A dead letter in the export format of `qworker dlq export`.",
    "properties": {
        "queue": {"type": "string"},
        "message_id": {"type": ["string", "null"]},
        "reason": {"type": "string"},
        "error_type": {"type": ["string", "null"]},
        "failed_at": {"type": ["string", "null"], "format": "date-time"},
        "fingerprint": {"type": "string"},
        "error_code": {"type": ["string", "null"]},
        "runbook": {"type": ["string", "null"]},
        "properties": {"type": "object"},
        "headers": {"type": "object"},
        "body": {"type": "string"},
        "body_encoding": {"enum": ["utf-8", "base64"]},
    },
}
_GROUP = {
    "type": "object",
    "properties": {
        "fingerprint": {"type": "string"},
        "count": {"type": "integer"},
        "reason": {"type": "string"},
        "error_type": {"type": ["string", "null"]},
        "handler": {"type": ["string", "null"]},
        "first": {"type": ["string", "null"], "format": "date-time"},
        "last": {"type": ["string", "null"], "format": "date-time"},
        "sample_message_id": {"type": ["string", "null"]},
        "error_code": {"type": ["string", "null"]},
        "runbook": {"type": ["string", "null"]},
        "pattern": {"type": "string"},
        "frame": {"type": "string"},
    },
}
_JOB_STARTED = {
    "description": "The job started",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"job": {"type": "string"}, "state": {"type": "string"}},
            }
        }
    },
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


DESCRIPTION: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "qworker console",
        "version": "1",
        "description": (
            "Inspect, group, replay, edit and purge dead letters. Reading never removes "
            "anything. Changes need `Authorization: Bearer <token>` (or a session and its "
            "CSRF token in `X-CSRF-Token`); a console started without a token is read-only."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Record": _RECORD, "Group": _GROUP, "Filter": _FILTER},
    },
    "paths": {
        "/api/dlqs": {
            "get": {
                "summary": "Every DLQ: depth, oldest failure, top groups, when it was scanned",
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}),
                    **_ERRORS,
                },
            }
        },
        "/api/dlqs/{dlq}/groups": {
            "get": {
                "summary": "The failure groups, largest first (a cached scan unless rescan=1)",
                "parameters": [
                    _DLQ,
                    {"name": "rescan", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _json({"type": "array", "items": _GROUP}), **_ERRORS},
            }
        },
        "/api/dlqs/{dlq}/messages": {
            "get": {
                "summary": "Matching dead letters, oldest first; X-Qworker-Next-Offset when more",
                "parameters": [
                    _DLQ,
                    *_FILTER_PARAMETERS,
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {"200": _json({"type": "array", "items": _RECORD}), **_ERRORS},
            }
        },
        "/api/dlqs/{dlq}/messages/{message_id}": {
            "get": {
                "summary": "One dead letter",
                "parameters": [_DLQ, _MESSAGE_ID],
                "responses": {"200": _json(_RECORD), **_ERRORS},
            }
        },
        "/api/dlqs/{dlq}/export": {
            "get": {
                "summary": "Matching dead letters as JSONL (the DLQ is unchanged)",
                "parameters": [
                    _DLQ,
                    *_FILTER_PARAMETERS,
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {
                    "200": {
                        "description": "JSONL",
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            }
        },
        "/api/dlqs/{dlq}/replay": {
            "post": {
                "summary": "Start a replay (or a dry run) of the matching dead letters",
                "security": [{"bearer": []}],
                "parameters": [_DLQ],
                "requestBody": _body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "filter": _FILTER,
                            "canary": {"type": "integer", "minimum": 0},
                            "canary_wait": {"type": "number"},
                            "canary_timeout": {"type": "number"},
                            "rate": {"type": ["number", "null"]},
                            "dry_run": {"type": "boolean"},
                            "to": {"type": ["string", "null"]},
                            "limit": {"type": ["integer", "null"]},
                        },
                    }
                ),
                "responses": {"202": _JOB_STARTED, **_ERRORS},
            }
        },
        "/api/dlqs/{dlq}/purge": {
            "post": {
                "summary": "Start deleting the matching dead letters (confirm: the DLQ's name)",
                "security": [{"bearer": []}],
                "parameters": [_DLQ],
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["confirm"],
                        "additionalProperties": False,
                        "properties": {
                            "filter": _FILTER,
                            "confirm": {"type": "string"},
                            "limit": {"type": ["integer", "null"]},
                        },
                    }
                ),
                "responses": {"202": _JOB_STARTED, **_ERRORS},
            }
        },
        "/api/dlqs/{dlq}/messages/{message_id}/edit": {
            "post": {
                "summary": "Replay one dead letter with a new body (validated by its handler)",
                "security": [{"bearer": []}],
                "parameters": [_DLQ, _MESSAGE_ID],
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["body"],
                        "additionalProperties": False,
                        "properties": {
                            "body": {"type": "string"},
                            "body_encoding": {"enum": ["utf-8", "base64"]},
                            "to": {"type": ["string", "null"]},
                        },
                    }
                ),
                "responses": {
                    "200": _json({"type": "object"}),
                    "422": _ERROR,
                    **_ERRORS,
                },
            }
        },
        "/api/jobs/{id}": {
            "get": {
                "summary": "A replay or purge job: state and counts, live",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json({"type": "object"}), **_ERRORS},
            }
        },
        "/api/openapi.json": {
            "get": {"summary": "This description", "responses": {"200": _json({"type": "object"})}}
        },
    },
}
