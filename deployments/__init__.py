"""Prefect deployments and work-pool templates that ship with diffpipe (package data)."""
