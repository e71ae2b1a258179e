"""Who may call the predict routes: bearer tokens (where they come from, and the check) and
the browser origins allowed to call cross-origin."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from batcher.errors import CORSForbidden, StartupError, Unauthorized, snippet

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="batcher"'}


def load_tokens(tokens_file: str, tokens_env: str, base_dir: Path) -> tuple[bytes, ...]:
    """Bearer tokens from a file (one a line, # comments) and a comma-separated variable."""
    tokens: list[str] = []
    if tokens_file:
        path = Path(tokens_file) if Path(tokens_file).is_absolute() else base_dir / tokens_file
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise StartupError(f"server.auth_tokens_file {path}: cannot read it: {exc.strerror}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if tokens_env:
        tokens += [item.strip() for item in os.environ.get(tokens_env, "").split(",") if item.strip()]
    if tokens_file and not tokens:
        raise StartupError(f"server.auth_tokens_file {tokens_file} holds no tokens")
    return tuple(token.encode() for token in dict.fromkeys(tokens))


@dataclass(frozen=True)
class Access:
    """The predict routes' gate: bearer tokens (none: no token needed) and origins."""

    tokens: tuple[bytes, ...] = ()
    origins: frozenset[str] = frozenset()
    """Origins allowed cross-origin (server.cors_allow_origins); "*" allows any."""

    def check(self, *, authorization: str | None, origin: str | None, host: str) -> None:
        """401 without a valid token (when tokens are set); 403 for a browser request from
        another origin that is not allowed. Browsers send a simple cross-origin POST
        (text/plain) without a preflight, so refusing the preflight is not enough."""
        allowed = origin is None or "*" in self.origins or origin in self.origins
        same_origin = origin is not None and origin.partition("://")[2].lower() == host.lower()  # /docs' "try it out"
        if not allowed and not same_origin:
            raise CORSForbidden(
                f"requests from origin {snippet(origin or '')} are not allowed (server.cors_allow_origins)"
            )
        if self.tokens:
            authorize(self.tokens, authorization)


def authorize(tokens: tuple[bytes, ...], header: str | None) -> None:
    """401 unless `Authorization: Bearer <token>` names one of `tokens`. Every token is
    compared, in constant time, whatever matches first. The header is compared as the bytes
    the client sent (aiohttp keeps undecodable bytes as surrogates), so any byte is safe."""
    scheme, _, given = (header or "").partition(" ")
    candidate = given.strip().encode("utf-8", "surrogateescape")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized(headers=CHALLENGE)
