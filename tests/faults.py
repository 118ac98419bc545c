"""Faults on demand for the tests: a loopback TCP proxy in front of a server (moto's S3) that
forwards, stalls, refuses or answers 500; processes found and killed by id."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

# An S3 error body botocore parses (a retryable 5xx).
INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class FaultyProxy:
    """A proxy on 127.0.0.1 in front of ``upstream`` (host, port). ``mode`` decides what each
    new connection meets:

    - ``forward``: the upstream server, byte for byte;
    - ``stall``: accepted, then never answered (until the proxy closes);
    - ``error``: every request answered ``500 InternalError``;
    - ``refuse``: closed at once, without a byte.

    ``connections`` counts the connections accepted in each mode.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "forward"
        self.connections: dict[str, int] = {}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._closed = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self.mode
            with self._lock:
                self.connections[mode] = self.connections.get(mode, 0) + 1
                self._open.append(client)
            handler = {
                "forward": self._forward,
                "stall": self._stall,
                "error": self._error,
                "refuse": self._refuse,
            }[mode]
            threading.Thread(target=handler, args=(client,), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        client.close()

    def _stall(self, client: socket.socket) -> None:
        self._closed.wait()
        client.close()

    def _error(self, client: socket.socket) -> None:
        with client, contextlib.suppress(OSError):
            buffer = b""
            while not self._closed.is_set():
                while b"\r\n\r\n" not in buffer:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buffer) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer[length:]
                client.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(INTERNAL_ERROR)}\r\n\r\n".encode()
                    + INTERNAL_ERROR
                )

    def _forward(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.append(server)

        def pipe(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := source.recv(65536):
                    sink.sendall(chunk)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        threading.Thread(target=pipe, args=(server, client), daemon=True).start()
        pipe(client, server)


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
    return ""


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still runs (one by one, by id)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
