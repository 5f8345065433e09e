"""A model to sample from: loading a checkpoint or a released-format directory (one process or
sharded over ranks), the sampling commands' shared flags, batched prompts over data-parallel
ranks, and pictures of the denoising. Used by generate, chat, evaluate and the lm-eval model."""
