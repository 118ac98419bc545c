"""S3 (and S3-compatible: MinIO, Ceph) options for the artefact store's filesystem.

The s3fs instance is private to each store (``skip_instance_cache``) and has its listings cache
turned off, so a listing always reflects the latest writes. When an endpoint is configured
(``endpoint_url`` storage option or ``AWS_ENDPOINT_URL``), botocore's request/response checksums
are set to ``when_required``, since many S3-compatible servers reject the newer default checksums.

Every request is bounded (``diffusion_core.remote``): botocore's connect and read timeouts and its
tries come from the settings (``config_kwargs`` in the storage options win), s3fs makes one pass,
uploads wait for no ``100 Continue``. An endpoint that accepts connections and never answers
fails a store operation after about attempts x (connect + read timeout) seconds, with a
StorageError naming the URL.
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
    it nor ``client_kwargs["endpoint_url"]`` is given; sets the timeouts and tries of the
    settings unless ``config_kwargs`` says otherwise; with an endpoint, sets botocore's checksum
    behaviour to ``when_required`` unless ``config_kwargs`` says otherwise; turns the instance
    and listings caches off unless asked for.
    """
    options = dict(storage_options or {})
    current = settings()
    endpoint = current.aws_endpoint_url
    if endpoint and not _has_endpoint(options):
        options["endpoint_url"] = endpoint
    config = current.s3_config() | dict(options.get("config_kwargs") or {})
    if _has_endpoint(options):
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
    options["config_kwargs"] = config
    options.setdefault("skip_instance_cache", True)
    options.setdefault("use_listings_cache", False)
    return options
