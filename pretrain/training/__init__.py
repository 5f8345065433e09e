"""One training run: the typed config, the launch layout and memory plan, the data and engine
set-up, the step loss, the learning-rate schedule, the held-out loss and the loop itself. Used
by the train and profile commands and the recipes (through `entry`)."""
