"""Model-agnostic blocks: they take tensors and modules, never a config."""
