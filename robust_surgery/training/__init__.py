"""Training: one loop (optimiser, schedule, adversarial batches, best epoch, resume, JSON log) and its configurations."""
