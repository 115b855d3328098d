"""Headless training: one generic loop plus one task module per trainable model."""
