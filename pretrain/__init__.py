"""What a run does: config, objectives, schedules, the training loop, validation, sampling, checkpoints."""
