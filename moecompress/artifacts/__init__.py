"""The plain data objects passed between pipeline stages, each with its own on-disk form."""
