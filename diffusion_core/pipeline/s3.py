"""S3 (and S3-compatible: MinIO, Ceph) options for the artefact store's filesystem.

The s3fs instance is private to each store (``skip_instance_cache``) and has its listings cache
turned off, so a listing always reflects the latest writes. When an endpoint is configured
(``endpoint_url`` storage option or ``AWS_ENDPOINT_URL``), botocore's request/response checksums
are set to ``when_required``, since many S3-compatible servers reject the newer default checksums.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.settings import settings


def _has_endpoint(options: dict[str, Any]) -> bool:
    client_kwargs = options.get("client_kwargs") or {}
    return bool(options.get("endpoint_url") or client_kwargs.get("endpoint_url"))


def s3_storage_options(storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Options for ``s3fs.S3FileSystem`` as the store uses them.

    Copies ``storage_options``; fills ``endpoint_url`` from ``AWS_ENDPOINT_URL`` when neither
    it nor ``client_kwargs["endpoint_url"]`` is given; with an endpoint, sets botocore's
    checksum behaviour to ``when_required`` unless ``config_kwargs`` says otherwise; turns the
    instance and listings caches off unless asked for.
    """
    options = dict(storage_options or {})
    endpoint = settings().aws_endpoint_url
    if endpoint and not _has_endpoint(options):
        options["endpoint_url"] = endpoint
    if _has_endpoint(options):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        options["config_kwargs"] = config
    options.setdefault("skip_instance_cache", True)
    options.setdefault("use_listings_cache", False)
    return options
