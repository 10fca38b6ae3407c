"""Bytes on disk: images, latent files, safetensors header checks, tar shards, the manifest, atomic writes."""
