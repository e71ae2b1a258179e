"""An asyncio load generator for batcher (and any server with the same API). Talks HTTP only;
the benchmark and reliability runners built on it live in `bench/`."""
