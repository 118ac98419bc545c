"""Bounded S3 requests, for every S3 filesystem diffpipe opens (the artefact store, image and
volume folders on S3).

Three things together bound how long a request to an endpoint that accepts connections and
never answers can wait:

- botocore's connect and read timeouts and its tries (``Settings.s3_config``:
  ``DIFFPIPE_STORE_CONNECT_TIMEOUT``, ``DIFFPIPE_STORE_READ_TIMEOUT``,
  ``DIFFPIPE_STORE_ATTEMPTS``), passed as ``config_kwargs``;
- s3fs's own retry loop around botocore's tries (5 passes by default, which would multiply them)
  reduced to one pass;
- no ``Expect: 100-continue`` on uploads: aiohttp arms no read timeout while it waits for the
  ``100 Continue``, so an upload to a stalled endpoint would otherwise wait for ever. (The header
  only lets a server refuse before the body is sent.)

So an operation fails after about attempts x (connect + read timeout) seconds.
"""

from __future__ import annotations

from typing import Any

S3_PROTOCOLS = ("s3", "s3a")
S3FS_PASSES = 1  # s3fs's retry loop around botocore's tries


def is_s3(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    return any(p in S3_PROTOCOLS for p in ((protocol,) if isinstance(protocol, str) else protocol))


def bounded(fs: Any) -> Any:
    """``fs`` with its requests bounded as this module says (other filesystems as they are).
    Builds the s3fs client now (no request is made)."""
    if not is_s3(fs):
        return fs
    from botocore.handlers import add_expect_header

    fs.retries = S3FS_PASSES
    fs.connect()
    fs.s3.meta.events.unregister("before-call.s3", add_expect_header)
    return fs
