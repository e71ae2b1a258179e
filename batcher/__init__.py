"""batcher: an async dynamic-batching inference server for ONNX text classifiers."""

__version__ = "0.1.0"
"""The one place the version is written: the wheel's metadata (pyproject.toml reads it
here), `batcher --version`, `GET /v2` and the OpenAPI document."""
