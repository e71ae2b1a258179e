"""batcher: an async dynamic-batching inference server for ONNX text classifiers."""

__version__ = "0.1.0"
