"""Calibration bundles: per-layer statistics the codec and the backend load and validate."""
