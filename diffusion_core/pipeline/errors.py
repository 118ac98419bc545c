"""The pipeline's errors: storage failures (transient or not) and a run that failed in a step."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator
from typing import Any


@functools.cache
def io_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean an I/O failure (imported lazily: botocore is slow to load)."""
    errors: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as AiohttpClientError

        errors.append(AiohttpClientError)
    return tuple(errors)


# ----------------------------------------------------------------------------- errors


class StorageError(RuntimeError):
    """An artefact store operation failed; names the operation and the URL."""

    def __init__(self, operation: str, url: str, detail: str = "") -> None:
        self.operation = operation
        self.url = url
        self.detail = detail
        super().__init__(f"{operation} {url}" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.operation, self.url, self.detail))


class ArtefactNotFoundError(StorageError):
    """The artefact (or a directory's manifest) does not exist."""


class IntegrityError(StorageError):
    """Stored content does not match its expected sha256 (or size)."""

    def __init__(
        self, operation: str, url: str, expected: str, actual: str, what: str = "sha256"
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.what = what
        super().__init__(operation, url, f"{what} mismatch: expected {expected}, actual {actual}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.operation, self.url, self.expected, self.actual, self.what),
        )


@contextlib.contextmanager
def translate_io(operation: str, url: str) -> Iterator[None]:
    """Turn file system / network errors into StorageError naming ``operation`` and ``url``."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise ArtefactNotFoundError(operation, url, "not found") from exc
    except Exception as exc:
        if isinstance(exc, io_errors()):
            raise StorageError(operation, url, f"{type(exc).__name__}: {exc}") from exc
        raise


class RunFailed(RuntimeError):
    """A pipeline run that failed in ``step``; ``cause`` is what the step raised."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step, self.cause = step, cause
        super().__init__(f"step {step}: {cause}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.cause))
