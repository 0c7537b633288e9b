"""Keep secrets out of MLflow params, logs and written configs.

Three kinds of secret reach a training run: credentials in config mappings
(``data.storage_options.secret``), passwords or tokens inside URLs
(``s3://user:pass@host``, ``?token=...``) and values of secret environment variables that
may be echoed in an error message. ``redact`` replaces all three, everywhere they appear.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# A mapping key names a secret when one of its ``_``-separated words is one of these.
_SECRET_WORDS = {"key", "secret", "token", "password", "passwd", "pwd", "credential",
                 "credentials", "auth", "authorization", "signature", "apikey"}
_ID_WORDS = {"id"}  # "key_id" / "access_key_id" identify an account; they are not secrets

# ``scheme://user:password@host`` — the password part.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+):(?P<pw>[^/\s@]+)@")
# ``?token=...`` / ``&X-Amz-Signature=...`` query parameters.
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:[A-Za-z0-9_-]*(?:token|signature|secret|password|key|credential)[A-Za-z0-9_-]*)=)"
    r"(?P<val>[^&\s#'\"]+)", re.IGNORECASE)
# Environment variables whose values are secrets, so an echo of them can be masked by value.
_SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|SESSION_KEY|API_KEY|ACCESS_KEY$)", re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    words = {w for w in re.split(r"[_\-.\s]+", name.lower()) if w}
    if words & _ID_WORDS:
        return False
    return bool(words & _SECRET_WORDS) or name.lower() in {"aws_secret_access_key", "aws_session_token"}


def _secret_env_values() -> list[str]:
    # Short values would mask ordinary words ("1", "true"); real secrets are long.
    vals = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str) -> str:
    out = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    out = _QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", out)
    for value in _secret_env_values():
        out = out.replace(value, MASK)
    return out


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (mappings, lists, strings) with every secret replaced by ``***``."""
    if isinstance(obj, Mapping):
        return {k: (MASK if is_secret_key(str(k)) and obj[k] not in (None, "", {}) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites each record's rendered message so handlers never see a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction() -> None:
    """Attach the filter to every handler of the root logger (idempotent)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
