"""Logging for the CLI: our verbosity for our loggers, libraries quiet, secrets redacted.

``-v``/``-vv`` raise only ``controller.*`` and ``engines.*``.  botocore and
paramiko log request headers (session tokens) and response bodies (the
private key of CreateKeyPair) at DEBUG, so their debug output needs its own
flag, and even then every record passes ``RedactSecrets`` before it is written.
"""

from __future__ import annotations

import logging
import re
from typing import TextIO

OUR_LOGGERS = ("controller", "engines")
FORMAT = "%(levelname)s %(name)s: %(message)s"

# what must never reach a log: PEM private keys (also as botocore's escaped response bodies), the
# key material field of EC2 replies, authorisation headers, session tokens, secret keys, HMAC keys
_SECRETS = [
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.S),
        "[private key redacted]",
    ),
    (re.compile(r"(KeyMaterial['\"]?\s*[:=>]\s*['\"]?)[^'\"<,}]*", re.I), r"\1[redacted]"),
    (re.compile(r"(<keyMaterial>).*?(</keyMaterial>|$)", re.I | re.S), r"\1[redacted]\2"),
    (
        re.compile(
            r"((?:Authorization|X-Amz-Security-Token|X-Amz-Credential|aws_session_token|aws_secret_access_key"
            r"|SecretAccessKey|SessionToken|Signature)['\"]?\s*[:=]\s*b?['\"]?)[^'\",}&\s]*",
            re.I,
        ),
        r"\1[redacted]",
    ),
    (
        re.compile(r"(['\"](?:key|curve_serverkey|curve_secretkey|curve_publickey)['\"]\s*:\s*b?['\"])[^'\"]*", re.I),
        r"\1[redacted]",
    ),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """On the handler, so it sees every record, also those propagated from library loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class CliLogging:
    """Installs one handler on the root logger for one CLI call; ``close`` puts everything back."""

    def __init__(self, stream: TextIO, verbosity: int = 0, debug_libraries: bool = False):
        self.root = logging.getLogger()
        self.handler = logging.StreamHandler(stream)
        self.handler.setFormatter(logging.Formatter(FORMAT))
        self.handler.addFilter(RedactSecrets())
        ours = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
        self.saved = [(self.root, self.root.level)] + [
            (logging.getLogger(n), logging.getLogger(n).level) for n in OUR_LOGGERS
        ]
        # libraries (botocore, paramiko, urllib3, ...) inherit the root's level: warnings only,
        # unless asked for by name
        self.root.setLevel(logging.DEBUG if debug_libraries else logging.WARNING)
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(ours)
        self.root.addHandler(self.handler)

    def close(self) -> None:
        self.root.removeHandler(self.handler)
        for logger, level in self.saved:
            logger.setLevel(level)
