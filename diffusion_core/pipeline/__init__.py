"""The pipeline: the artefact store, its layout, the modalities and the stages."""
