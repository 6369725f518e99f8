"""One exception tree for the whole project.

Every error a user can cause or meet is one of these; third-party exceptions are wrapped at the
boundary with ``raise ... from e`` and a message that says what to do. Each class knows the exit
code the CLI returns and the HTTP status a service answers with::

    OptiserveError                      exit 1, HTTP 500 (a bug or an unexpected failure)
    ├── ConfigError                     exit 2, HTTP 400  bad flags, bad YAML, misspelt keys, wrong types
    ├── ModelError                      exit 3            unknown built-in, missing or unreadable model file
    ├── ArtifactError                   exit 4            missing, corrupted or hand-edited artifact/manifest
    │   └── DiskFull                                      the disk filled up while writing (nothing half-done)
    ├── PluginUnavailable               exit 5            a plugin whose package is missing
    ├── OptimizationError               exit 6            an optimizer failed on this model
    ├── ServingError                    exit 7, HTTP 503  a server did not start, not ready, or shed a request
    ├── LoadTestError                   exit 8            the load generator failed or produced no samples
    ├── SloNotMet                       exit 9            `tune`: no configuration searched met the SLO
    ├── InputValidationError            exit 2, HTTP 400  a malformed request (bad JSON, missing fields)
    │   ├── InvalidInput                        HTTP 422  well-formed, but shape/datatype/values do not fit
    │   ├── PayloadTooLarge                     HTTP 413  body or batch above the service's limits
    │   ├── UnsupportedMediaType                HTTP 415  a content type or encoding the service does not take
    │   └── NotFound                            HTTP 404  a model name or version this service does not serve
    └── Interrupted                     exit 130          Ctrl-C / SIGTERM: everything was stopped cleanly
"""

from __future__ import annotations


class OptiserveError(Exception):
    """Base class. The message is one line a user can act on."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(OptiserveError):
    exit_code = 2
    http_status = 400


class ModelError(OptiserveError):
    exit_code = 3
    http_status = 400


class ArtifactError(OptiserveError):
    exit_code = 4


class DiskFull(ArtifactError):
    """The filesystem filled up while an artifact or a result was written: fatal for the whole run (the
    next step would fail the same way), never a per-optimizer skip."""


class PluginUnavailable(OptiserveError):
    exit_code = 5


class OptimizationError(OptiserveError):
    exit_code = 6


class ServingError(OptiserveError):
    exit_code = 7
    http_status = 503

    def __init__(self, message: str, *, hint: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s
        """Whole seconds a client should wait before it retries (the 503's ``Retry-After``; None: 1)."""


class LoadTestError(OptiserveError):
    exit_code = 8


class SloNotMet(OptiserveError):
    exit_code = 9


class InputValidationError(OptiserveError):
    exit_code = 2
    http_status = 400


class InvalidInput(InputValidationError):
    http_status = 422


class PayloadTooLarge(InputValidationError):
    http_status = 413


class UnsupportedMediaType(InputValidationError):
    http_status = 415


class NotFound(InputValidationError):
    http_status = 404


class Interrupted(OptiserveError):
    exit_code = 130
