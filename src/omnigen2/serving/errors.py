"""OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, for every failure the server answers.

Status codes: 400 a malformed or out-of-bounds request; 401 a missing or wrong API key; 404 an unknown route or
model; 405 a wrong method; 413 a body above the upload limit; 422 a well-formed request whose content cannot be
used (an image that does not decode, sizes the model refuses); 429 the queue is full; 500 an unexpected failure
(the message says only that, the traceback goes to the server's log); 503 the server is shutting down;
504 the request ran past ``--request-timeout``.
"""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unprocessable(message: str, param: str | None = None, code: str | None = "invalid_image") -> APIError:
    return APIError(422, message, param=param, code=code)


def unauthorized() -> APIError:
    return APIError(
        401,
        "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def not_found(message: str, code: str = "not_found", param: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"request body above the limit of {limit} bytes (--max-upload-bytes)", code="request_too_large"
    )


def queue_full(retry_after: int) -> APIError:
    return APIError(
        429,
        f"the server's queue is full; retry in about {retry_after} s",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"the request ran past the server's limit of {seconds:g} s", type="timeout", code="timeout")


def internal() -> APIError:
    return APIError(500, "internal server error (the server's log has the details)", type="server_error")
