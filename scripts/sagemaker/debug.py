"""`--debug`: botocore's own DEBUG log of every AWS call, with credentials redacted."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator

_SECRET_HEADERS = r"(x-amz-security-token|authorization|aws_secret_access_key)"
CREDENTIAL_IN_LOG = (
    # quoted, as in a logged dict: 'X-Amz-Security-Token': b'...'
    re.compile(_SECRET_HEADERS + r"""(['"]?\s*[:=]\s*b?)(['"])(.*?)\3""", re.I),
    # bare, as in the canonical request: x-amz-security-token:...
    re.compile(_SECRET_HEADERS + r"(\s*[:=]\s*)([^\s'\",;}]+)", re.I),
)


def redact(text: str) -> str:
    quoted, bare = CREDENTIAL_IN_LOG
    text = quoted.sub(lambda m: f"{m[1]}{m[2]}{m[3]}<redacted>{m[3]}", text)
    return bare.sub(lambda m: f"{m[1]}{m[2]}<redacted>", text)


class RedactCredentials(logging.Filter):
    """botocore's DEBUG log prints signed headers: the session token (SSO, assumed roles) and
    the Authorization header. Both are replaced before anything is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


@contextlib.contextmanager
def debug_logging(enabled: bool) -> Iterator[None]:
    """--debug: botocore's own DEBUG log (every request and response) on stderr, for this run,
    with credentials redacted (RedactCredentials)."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("botocore")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s [%(levelname)s] %(message)s"))
    handler.addFilter(RedactCredentials())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
