"""Data for training and evaluation: corpus, tokenizer contract, shard preparation and format, the streaming packed stream with the 1% variable length, SFT batches, the evaluation sampler."""
