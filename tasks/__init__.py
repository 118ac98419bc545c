"""Prefect tasks: thin adapters over diffusion_core."""
