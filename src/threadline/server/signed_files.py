"""Signed file URLs, as Dify hands them out: `<origin>/files/<id>/file-preview?timestamp=&nonce=&sign=`.

A browser showing a conversation's images has no app key, and a Dify front end resolves a relative
URL against its own origin; so `/v1/messages` (and an upload's `source_url`) give an absolute URL
that carries its own permission. `sign` is the URL-safe base64 HMAC-SHA256 of
`file-preview|<id>|<timestamp>|<nonce>` (Dify's own scheme, core/file/helpers.py), `timestamp` the
signing time; the URL is good for `[server] file_url_ttl` seconds after it (Dify's default: 300).

The key: `[server] file_secret` (or THREADLINE_FILE_SECRET), else one made once and kept in the
database (`server_secrets`), so every process of a deployment accepts what any of them signed. It
is never logged, and never part of an answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from urllib.parse import quote

SECRET_NAME = "file_url"
MAX_PARAM_CHARS = 128  # a timestamp, a 32-hex nonce and a 44-character sign fit many times over


def clock() -> float:
    """The current time; the tests move it."""
    return time.time()


def new_secret() -> str:
    return secrets.token_urlsafe(48)


class FileSigner:
    def __init__(self, secret: str, ttl: int) -> None:
        self._key = secret.encode()
        self.ttl = ttl

    def __repr__(self) -> str:  # never the key
        return f"FileSigner(ttl={self.ttl})"

    def _sign(self, file_id: str, timestamp: str, nonce: str) -> str:
        msg = f"file-preview|{file_id}|{timestamp}|{nonce}".encode()
        return base64.urlsafe_b64encode(hmac.new(self._key, msg, hashlib.sha256).digest()).decode()

    def url(self, origin: str, file_id: str) -> str:
        """The signed URL of a file, under `origin` (scheme://host[:port][/prefix], no trailing slash)."""
        timestamp = str(int(clock()))
        nonce = secrets.token_hex(16)
        sign = quote(self._sign(file_id, timestamp, nonce), safe="")
        return f"{origin}/files/{quote(file_id, safe='')}/file-preview?timestamp={timestamp}&nonce={nonce}&sign={sign}"

    def verify(self, file_id: str, timestamp: str, nonce: str, sign: str) -> bool:
        """Whether the signature is this server's for this file, and still within its time."""
        if not (0 < len(timestamp) <= 20 and timestamp.isascii() and timestamp.isdigit()):
            return False
        if len(nonce) > MAX_PARAM_CHARS or len(sign) > MAX_PARAM_CHARS or len(file_id) > MAX_PARAM_CHARS:
            return False
        expected = self._sign(file_id, timestamp, nonce)
        if not hmac.compare_digest(expected.encode(), sign.encode("utf-8", "surrogateescape")):
            return False
        age = int(clock()) - int(timestamp)
        return -60 <= age <= self.ttl  # a minute's clock skew between processes; none in the future beyond it
