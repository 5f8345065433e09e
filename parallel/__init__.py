"""How the model is built and split: model config and presets, the LLaDA transformer from a layer
factory (plain torch at TP 1, megatron-core's tensor-parallel layers above), attention backends,
rank topology and pipeline stages, building this rank's model (`build`), the DeepSpeed engine and
its config, and the memory plan. Never imports `pretrain`."""
