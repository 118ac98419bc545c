"""Prefect flows and the diffpipe command line."""
