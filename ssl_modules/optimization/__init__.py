"""Optimizers (AdamW, LARS, parameter groups) and the closed-form schedules of the global step."""
