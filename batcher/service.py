"""What the HTTP layer serves: the loaded bundle, encoder and batcher, and the readiness state.

Built empty when the app is created and filled by the lifecycle once the model is loaded
and warm; handlers reach it through `request.app[SERVICE]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from batcher.batching import Batcher
from batcher.config import Settings
from batcher.dialogue import dialogue_text
from batcher.errors import Draining, NotReady
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
        return self.warm and not self.draining and batcher is not None and batcher.alive and not batcher.last_run_failed

    def require_batcher(self) -> tuple[TextEncoder, Batcher]:
        """The encoder and batcher, or 503 while loading, draining or after a crash."""
        if self.draining:
            raise Draining()
        if self.encoder is None or self.batcher is None or not self.warm:
            raise NotReady()
        return self.encoder, self.batcher

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
