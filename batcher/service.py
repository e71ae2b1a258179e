"""What the HTTP layer serves: the loaded bundle, encoder and batcher, and the readiness state.

Built empty when the app is created and filled by the lifecycle once the model is loaded
and warm; handlers reach it through `request.app[SERVICE]`.
"""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from batcher.batching import Batcher
from batcher.config import Settings
from batcher.dialogue import dialogue_text
from batcher.errors import Draining, NotReady, StartupError, Unauthorized
from batcher.metrics import Metrics
from batcher.model import ModelBundle
from batcher.schemas import PredictRequest
from batcher.tokenization import Encoded, TextEncoder

# Characters of dialogue kept before tokenizing: comfortably more than max_seq_len tokens
# need, so truncation happens in the tokenizer, yet a 1 MiB body never reaches it whole.
CHARS_PER_TOKEN_BUDGET = 4


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    bundle: ModelBundle | None = None
    encoder: TextEncoder | None = None
    batcher: Batcher | None = None
    provider: str = "none"
    warm: bool = False
    draining: bool = False
    tokens: tuple[bytes, ...] = ()
    """Accepted bearer tokens; empty = the predict routes are open."""
    started_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.settings.model.name or (self.bundle.name if self.bundle else "")

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels if self.bundle else []

    @property
    def ready(self) -> bool:
        batcher = self.batcher
        return (
            self.warm
            and not self.draining
            and batcher is not None
            and batcher.alive
            and not batcher.last_run_failed
            and not batcher.stalled
        )

    def require_batcher(self) -> tuple[TextEncoder, Batcher]:
        """The encoder and batcher, or 503 while loading, draining or after a crash."""
        if self.draining:
            raise Draining()
        if self.encoder is None or self.batcher is None or not self.warm:
            raise NotReady()
        return self.encoder, self.batcher

    def authorize(self, header: str | None) -> None:
        """401 unless `Authorization: Bearer <token>` names an accepted token (when any are set).
        Every token is compared, in constant time, whatever matches first."""
        if not self.tokens:
            return
        scheme, _, given = (header or "").partition(" ")
        candidate = given.strip().encode()
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(candidate, token)
        if scheme.lower() != "bearer" or not matched:
            self.metrics.rejected.labels("unauthorized").inc()
            raise Unauthorized(headers={"WWW-Authenticate": 'Bearer realm="batcher"'})

    def encode(self, encoder: TextEncoder, request: PredictRequest) -> Encoded:
        started = time.perf_counter()
        text = dialogue_text(
            ((turn.speaker, turn.text) for turn in request.turns),
            max_chars=encoder.max_seq_len * CHARS_PER_TOKEN_BUDGET,
        )
        encoded = encoder.encode(text)
        self.metrics.tokenize.observe(time.perf_counter() - started)
        return encoded

    def begin_drain(self) -> None:
        """Readiness drops and new predictions get 503 from now on."""
        self.draining = True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.accepting = False


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
