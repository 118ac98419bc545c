"""diffusion_core: schedules, networks, losses, training, samplers and data for image diffusion.

The library knows nothing of orchestration or tracking: it never imports prefect or mlflow.
"""

__version__ = "0.1.0"
