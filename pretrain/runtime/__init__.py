"""What runs beside the training loop: guard rails and the hang watchdog, rank failures and the
rank supervisor, preemption, stragglers, throughput and FLOPs, metrics and experiment trackers.
Imports nothing here: the rank supervisor must start before torch loads."""
