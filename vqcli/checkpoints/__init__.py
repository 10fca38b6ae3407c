"""Weights in and out: the registry of presets and embedded models, vqcli's native file, foreign formats, key layouts."""
