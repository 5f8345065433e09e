"""Data for training and evaluation: the corpus, the tokenizer contract, shard preparation and
format, the streaming packed stream with the 1% variable length, SFT batches, held-out batches
and the evaluation sampler. Never imports `pretrain`; the training loop, the held-out loss and
evaluation read from it."""
