"""The paper's mathematics on any logits callable: the forward process and the training
objectives (Algorithms 1 and 2, the autoregressive baseline), the Algorithm 3 likelihood, and the
reverse process (the official sampler and fast decoding). Used by training, inference and
evaluation alike; it knows nothing of engines, ranks or files."""
