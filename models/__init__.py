"""Models: the shared encoder and the registered generators."""
