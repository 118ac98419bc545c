"""Judging samples: the domain classifier, fidelity metrics, volume statistics, inpainting,
the shapes detector, the sampler sweep and the promotion rule."""
