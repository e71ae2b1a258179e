"""Peer servers for the benchmark, each run from its own pinned virtual environment
(`make bench-peers-setup`): mosec and PyTriton serving the same bundle with the same
dialogue text, tokenizer, truncation, padding to each batch's longest row and softmax as
batcher (`common.Classifier`); Infinity serving the same graph with its own engine
(`infinity_server`), fed the text batcher builds."""
