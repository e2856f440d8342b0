"""The serving core: loaded versions (repository, runtime, batcher), the data plane and generation."""
