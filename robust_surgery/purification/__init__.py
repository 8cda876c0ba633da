"""Purification diagnostics: per-unit purity scores, feature bases, the layer report, inheritance."""
