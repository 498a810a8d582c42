"""AWS's error replies, read the same way by every step: the error code, and "not found"."""

from __future__ import annotations


def error_code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


def is_not_found(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    code = error_code(error)
    message = error.response.get("Error", {}).get("Message", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (
        code in ("404", "NoSuchKey", "NotFound", "ResourceNotFound", "ObjectNotFoundException")
        or status == 404
        or (code == "ValidationException" and "Could not find" in message)
    )
