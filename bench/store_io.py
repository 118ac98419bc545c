"""The artefact store's directory transfers measured: files per second of ``put_dir`` and
``get_dir`` for many small files, one file at a time (concurrency 1, what the store did before
it batched) and batched (the default concurrency), in one run.

Targets: S3 on moto's server (started here in its own process on 127.0.0.1, so that the server
does not share this process's interpreter); the same behind a proxy that holds every chunk the
client sends for ``--latency-ms`` (a stand-in for a remote S3, where each request waits for the
network); and local disk (a temporary folder). Each
measurement writes a fresh prefix: ``put_dir`` commits the directory (every file, then the
manifest), ``get_dir`` reads it back and verifies every sha256. The default set is what the
watermark step commits: 1,000 files of 512 bytes (about a marked 16x16 PNG).

    python bench/store_io.py [--files 1000] [--size 512] [--concurrency 1 16] [--repeats 3]
                             [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion_core.pipeline.store import ArtefactStore  # noqa: E402

BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int) -> subprocess.Popen[bytes]:
    """moto's S3 server in a child process, listening on 127.0.0.1 only."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"moto's server did not start on port {port}")


def start_delay_proxy(upstream: int, latency: float) -> int:
    """A TCP proxy on 127.0.0.1 (in a thread) to ``upstream`` that holds each chunk the client
    sends for ``latency`` seconds before passing it on; returns its port."""
    ready: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float):
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(
            pipe(client_r, server_w, latency), pipe(server_r, client_w, 0.0), return_exceptions=True
        )

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    while not ready:
        time.sleep(0.05)
    return ready[0]


def make_files(folder: Path, count: int, size: int) -> Path:
    for i in range(count):
        (folder / f"{i:05d}.png").write_bytes(os.urandom(size))
    return folder


def measure(store: ArtefactStore, source: Path, count: int, repeats: int) -> dict[str, float]:
    """Median files per second of put_dir and get_dir over ``repeats`` fresh prefixes."""
    put, get = [], []
    for _ in range(repeats):
        prefix = f"runs/{uuid.uuid4().hex}/published"
        t0 = time.perf_counter()
        store.put_dir(prefix, source)
        put.append(count / (time.perf_counter() - t0))
        with tempfile.TemporaryDirectory() as dest:
            t0 = time.perf_counter()
            store.get_dir(prefix, dest)
            get.append(count / (time.perf_counter() - t0))
    return {"put_dir": statistics.median(put), "get_dir": statistics.median(get)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--size", type=int, default=512, help="bytes per file")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=20.0, help="the proxy's hold per chunk")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    server = start_moto(port)
    slow = f"http://127.0.0.1:{start_delay_proxy(port, args.latency_ms / 1000)}"
    rows = []
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "src").mkdir()
            source = make_files(Path(tmp, "src"), args.files, args.size)
            for target, root, options in (
                ("s3 (moto server)", f"s3://{BUCKET}/store-io", {"endpoint_url": endpoint}),
                (f"s3 +{args.latency_ms:g} ms", f"s3://{BUCKET}/slow", {"endpoint_url": slow}),
                ("local disk", str(Path(tmp, "local")), None),
            ):
                store = ArtefactStore(root, storage_options=options)
                for concurrency in args.concurrency:
                    os.environ["DIFFPIPE_STORE_CONCURRENCY"] = str(concurrency)  # read per call
                    rates = measure(store, source, args.files, args.repeats)
                    rows.append({"target": target, "concurrency": concurrency, **rates})
                    print(
                        f"{target:17s} concurrency {concurrency:3d}: put_dir "
                        f"{rates['put_dir']:8.1f} files/s, get_dir {rates['get_dir']:8.1f} files/s",
                        flush=True,
                    )
    finally:
        server.terminate()
        server.wait(timeout=30)
    info = {
        "files": args.files,
        "bytes_per_file": args.size,
        "repeats": args.repeats,
        "latency_ms": args.latency_ms,
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
