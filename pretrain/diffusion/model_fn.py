"""What the diffusion mathematics asks of a model: two callables, so the objectives, the
likelihood and the sampler serve the training engine, a pipeline, an inference model and the
exported Hugging Face model alike."""

from __future__ import annotations

from typing import Callable

import torch

# (ids [b, s], attention_mask=None, **forward arguments) -> logits [b, s, vocab] in the model's dtype
# (the sampler takes its confidences in that dtype, as the official code does).
LogitsFn = Callable[..., torch.Tensor]

# (noisy ids, targets, loss mask) -> per-token fp32 cross-entropy [b, s]: the training model's
# loss path (chunked and vocabulary-parallel), which never materialises whole-vocabulary logits.
TokenCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
