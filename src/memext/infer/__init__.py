"""Inference: KV caches and generation."""
