"""The exception types cloudtask raises. Each docstring is the default message.

Callers catch these, not driver errors: a driver error is kept as ``__cause__``.
"""

from __future__ import annotations

import errno

from cloudtask_wire.messages import ProtocolError  # the wire's own error type, re-exported (one source)
from cloudtaskd import redact

__all__ = [
    "BadInput",
    "Busy",
    "CapacityError",
    "CloudtaskError",
    "ConfigError",
    "DaemonBusy",
    "DaemonUnavailable",
    "DatabaseUnavailable",
    "InvalidRequest",
    "LeaseError",
    "NotFound",
    "ProtocolError",
    "ProviderAuthError",
    "ProviderError",
    "QuotaExceeded",
    "SharedCaMismatch",
    "SharedIdentityMismatch",
    "SharedSshKeyMismatch",
    "StoreError",
    "StoreFull",
    "TransientProviderError",
    "TransitionError",
]


class CloudtaskError(Exception):
    """cloudtask failed."""

    def __init__(self, message: str | None = None) -> None:
        # Redacted here, once for every error type: a message may quote a cloud SDK's or a remote
        # command's own text, which can hold a credential from the config.
        super().__init__(redact.redact(message or (self.__doc__ or "").strip()))


class ConfigError(CloudtaskError):
    """The configuration is invalid."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {key}: {message}")


class BadInput(CloudtaskError):
    """A request or file was refused; nothing was changed."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        self.line = line
        self.field = field
        super().__init__(message)


class NotFound(CloudtaskError):
    """No such job, task or instance."""


def no_job(job_id: int) -> NotFound:
    """The one answer for a job id that names no job, whichever command asked."""
    return NotFound(f"no job {job_id}")


class StoreError(CloudtaskError):
    """The state database failed (disk full, corrupt, locked)."""


# What a write that ran out of room fails with: no space on the filesystem, or over the user's quota.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(exc: BaseException) -> bool:
    """An OSError that says the filesystem (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


class StoreFull(StoreError):
    """The state disk is full: new work is refused until space is freed; running work goes on."""

    # What a running daemon does meanwhile, and what the refused request should do.
    RUNNING = ("cloudtaskd carries on by itself once there is room: tasks already running keep going and "
               "their results are recorded then. Nothing of this request was kept: submit it again then")

    def __init__(self, path: str | object, doing: str = "", *, advice: str = RUNNING) -> None:
        self.path = str(path)
        self.doing = doing
        what = f" while {doing}" if doing else ""
        super().__init__(f"the state disk is full: no space left at {self.path}{what}. Free space on that "
                         f"filesystem (or give state_dir a bigger one); {advice}.")


class DatabaseUnavailable(StoreError):
    """PostgreSQL could not be reached or refused us: check the `database` setting and the server."""

    def __init__(self, dsn: str, message: str, *, retryable: bool) -> None:
        self.dsn = dsn  # shown form: the password is <SECRET>
        self.retryable = retryable  # True: the server may be back soon (down, restarting, full)
        super().__init__(f"{message} (database: {dsn})")


class TransitionError(StoreError):
    """A state change found its row in another state than expected: a lost race, refused cleanly."""


class FleetFull(StoreError):
    """No launch: the fleet is at scaling.max_instances or the provider's max_instances, counted over
    every replica's instances in the database (one quota pool)."""

    def __init__(self, limit_key: str, limit: int, live: int) -> None:
        self.limit_key = limit_key  # the config key whose limit was reached
        self.limit = limit
        self.live = live
        super().__init__(f"{limit_key} is {limit} and {live} instances are live: no launch until one ends"
                         f" (raise {limit_key} to allow more)")


class UploadBusy(CloudtaskError):
    """Another upload of the job is under way (on this replica or another): try again once it is done."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} has another upload under way (one at a time per job, on every replica):"
                         " nothing of this file was added; send it again once that upload has finished")


class UploadSettled(CloudtaskError):
    """The upload was settled by another cloudtaskd replica while this one received it."""

    def __init__(self, job_id: int, upload_id: int | None = None) -> None:
        self.job_id = job_id
        self.upload_id = upload_id
        which = f"upload {upload_id}" if upload_id is not None else "the upload"
        super().__init__(f"{which} of job {job_id} was settled by another cloudtaskd replica (this one lost its"
                         " hold on it, e.g. the database restarted): nothing of this file was added; send it again")


class LeaseError(CloudtaskError):
    """A lease report was refused (stale fencing token, or the task is no longer leased)."""


class SharedIdentityMismatch(CloudtaskError):
    """This replica's credentials are not the ones the other replicas on its database use: it refuses to start."""

    def __init__(self, message: str, *, meta_key: str, own: str, recorded: str, path: str, reset_sql: str) -> None:
        self.meta_key = meta_key  # where the database records the replicas' fingerprint
        self.own = own  # this replica's fingerprint
        self.recorded = recorded  # the one the first replica recorded
        self.path = path  # this replica's file, which the message names
        self.reset_sql = reset_sql  # forgets the record (the message quotes it)
        super().__init__(message)


class SharedCaMismatch(SharedIdentityMismatch):
    """This replica's TLS CA is not the one the other replicas on its database use: it refuses to start."""

    def __init__(self, *, own_sha256: str, recorded_sha256: str, ca_path: str, reset_sql: str, meta_key: str) -> None:
        self.own_sha256 = own_sha256
        self.recorded_sha256 = recorded_sha256
        self.ca_path = ca_path
        tls_dir = ca_path.rsplit("/", 1)[0] if "/" in ca_path else "."
        super().__init__(
            f"this replica's TLS CA {ca_path} (sha256 {short_sha256(own_sha256)}) is not the CA the replicas on this"
            f" database use (sha256 {short_sha256(recorded_sha256)}, recorded by the first replica that started):"
            " agents pin one CA and could not fail over to this replica. Copy ca.pem and ca.key from"
            f" <state_dir>/tls of a replica that is running into {tls_dir}/ and start this one again (it issues its"
            " server certificate from them). Or, to make this CA the replicas' CA instead, stop every replica,"
            f" run `{reset_sql}` on the database and start this one first; then copy its ca.pem and ca.key to the"
            " others, and restart the instances whose agents pinned the old CA (docs/replicas.md, The shared TLS CA).",
            meta_key=meta_key, own=own_sha256, recorded=recorded_sha256, path=ca_path, reset_sql=reset_sql)


class SharedSshKeyMismatch(SharedIdentityMismatch):
    """This replica logs in to a cloud's VMs with another SSH key than the other replicas: it refuses to start."""

    def __init__(self, *, provider: str, own_fingerprint: str, recorded_fingerprint: str, key_path: str,
                 key_setting: str, reset_sql: str, meta_key: str) -> None:
        self.provider = provider
        self.key_setting = key_setting  # the config key naming the file: providers.<name>.ssh_key_file
        super().__init__(
            f"{provider}: this replica's SSH key {key_path} ({own_fingerprint}) is not the key the replicas on this"
            f" database log in to {provider} VMs with ({recorded_fingerprint}, recorded by the first replica that"
            f" started): a VM carries only the public key of the replica that launched it, so this replica could"
            f" neither re-tunnel nor stop the others' VMs. Copy the key pair ({key_path} and {key_path}.pub) from a"
            f" replica that is running over this one's, or set {key_setting} to a copy of that key, and start this"
            f" one again (compare with `ssh-keygen -lf {key_path}`). Or, to make this key the replicas' key instead,"
            f" stop every replica, run `{reset_sql}` on the database and start this one first, then give its key to"
            f" the others; {provider} VMs launched with the old key keep only that one"
            " (docs/replicas.md, One SSH key for the clouds' VMs).",
            meta_key=meta_key, own=own_fingerprint, recorded=recorded_fingerprint, path=key_path, reset_sql=reset_sql)


def short_sha256(hex_digest: str) -> str:
    """A fingerprint as people compare it: its first 16 hex digits (64 bits: no two CAs alike by chance)."""
    return hex_digest[:16]


class DaemonUnavailable(CloudtaskError):
    """cloudtaskd is not reachable."""


class StateDirBusy(CloudtaskError):
    """Another cloudtaskd holds the state directory's lock."""


class DaemonStopping(DaemonUnavailable):
    """This cloudtaskd is stopping and takes no new `cloudtaskctl run`: start one of your own."""


class Busy(CloudtaskError):
    """cloudtaskd is busy: too many control requests at once. Try again shortly."""

    def __init__(self, message: str | None = None, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DaemonBusy(CloudtaskError):
    """cloudtaskd is running but too busy to answer: try again in a moment."""


class ProviderError(CloudtaskError):
    """A provider operation failed."""

    def __init__(self, provider: str, op: str, message: str, *, retryable: bool = False) -> None:
        self.provider = provider
        self.op = op
        self.retryable = retryable
        super().__init__(f"{provider}: {op}: {message}")


class CapacityError(ProviderError):
    """The cloud has no capacity for this offer right now (spot or zonal stock-out): try elsewhere."""

    def __init__(self, provider: str, op: str, message: str) -> None:
        super().__init__(provider, op, message, retryable=True)


class QuotaExceeded(ProviderError):
    """An account quota or limit blocks this request: try another region/type, or raise the quota."""


class ProviderAuthError(ProviderError):
    """Credentials are missing, wrong, or not allowed to do this: fix the provider's config."""


class InvalidRequest(ProviderError):
    """The cloud refused the request as malformed (bad image, type, zone): a config error, not retried."""


class TransientProviderError(ProviderError):
    """A passing failure (throttling, 5xx, timeouts): retried with backoff."""

    def __init__(self, provider: str, op: str, message: str) -> None:
        super().__init__(provider, op, message, retryable=True)
