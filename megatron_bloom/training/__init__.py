"""Training: engine, schedules, data plumbing, the pretraining loop."""
