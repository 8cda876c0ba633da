"""Model surgery: convert Linear/Conv layers to NRPM and back, presets, recalibration, cost reports."""
