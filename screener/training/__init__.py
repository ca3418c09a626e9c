"""Training: training sets, the Ray Train loop, the gap set and gap head, evaluation and metrics."""
