"""The pipeline over the artefact store: one module per stage, each reading its inputs by URL and
committing its outputs atomically."""
