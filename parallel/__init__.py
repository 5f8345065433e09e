"""How the model is built and split: model config and presets, the model, layer factory, attention, DeepSpeed engine."""
