"""The pipeline: one module per phase that reads a config and a workdir and calls the library."""
