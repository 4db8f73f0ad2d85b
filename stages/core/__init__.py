"""What several stages share: dataset format, models, training loop, checkpoints, tracking."""
