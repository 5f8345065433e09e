"""Data for training: corpus, tokenizer contract, packed token batches, the 1% variable length."""
