"""The model side: how a bundle on disk becomes answers, in one room.

`bundle` reads a bundle directory (graph, labels, the model's config and tokenizer files, its
declared serving format) and versions it; `tokenization` loads its tokenizer; `formats`
turns a request's text, pair or dialogue into the model's token ids, as the model was
trained to read it; `session` runs the ONNX Runtime graph; `heads` turns the graph's
scores into probabilities and answers. The engine (batcher, queue, worker) only moves
token ids and score rows, and knows no model's language.
"""
