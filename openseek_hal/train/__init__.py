"""Training: the trainer, configs, checkpoints, schedules and logging."""
