"""An asyncio load generator for batcher (and any server with the same API). Talks HTTP only."""
