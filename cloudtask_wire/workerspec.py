"""The worker description (`cloudtask.yaml` in the worker directory), validated.

cloudtaskd reads the YAML and validates it with `WorkerSpec.from_dict` before any instance
starts; the agent receives the same dict as JSON (`worker.json`), so it needs no YAML parser.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cloudtask_wire.compat import SLOTS

MODES = ("command", "stream", "python")
SPEC_FILE = "cloudtask.yaml"
RESOLVED_SPEC_FILE = "worker.json"


class WorkerSpecError(ValueError):
    """cloudtask.yaml is missing a key or has a value of the wrong kind."""

    def __init__(self, key: str, message: str, *, source: str = SPEC_FILE) -> None:
        self.key = key
        self.source = source
        super().__init__(f"{source}: {key}: {message}")


@dataclass(frozen=True, **SLOTS)
class WorkerSpec:
    mode: str
    command: str | None = None
    function: str | None = None
    setup: str | None = None
    cpus_per_task: float = 1.0
    memory_per_task: int | None = None  # MiB
    timeout: float | None = None  # seconds, default per-task timeout

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = SPEC_FILE) -> WorkerSpec:
        if not isinstance(raw, dict):
            raise WorkerSpecError("(top level)", "expected a mapping of keys to values", source=source)
        known = {"mode", "command", "function", "setup", "cpus_per_task", "memory_per_task", "timeout"}
        for key in raw:
            if key not in known:
                raise WorkerSpecError(str(key), f"unknown key (expected one of {', '.join(sorted(known))})",
                                      source=source)
        mode = raw.get("mode")
        if mode not in MODES:
            raise WorkerSpecError("mode", f"expected one of {', '.join(MODES)}, got {mode!r}", source=source)

        def opt_str(key: str) -> str | None:
            value = raw.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise WorkerSpecError(key, "expected a non-empty string", source=source)
            return value

        def opt_num(key: str, *, integer: bool = False) -> float | None:
            value = raw.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise WorkerSpecError(key, f"expected a positive number, got {value!r}", source=source)
            if integer and int(value) != value:
                raise WorkerSpecError(key, f"expected a whole number, got {value!r}", source=source)
            return value

        command, function = opt_str("command"), opt_str("function")
        if mode in ("command", "stream") and command is None:
            raise WorkerSpecError("command", f"required for mode {mode}", source=source)
        if mode == "python":
            if function is None:
                raise WorkerSpecError("function", "required for mode python (module:function)", source=source)
            module, _, attr = function.partition(":")
            if not module or not attr:
                raise WorkerSpecError("function", f"expected module:function, got {function!r}", source=source)
        memory = opt_num("memory_per_task", integer=True)
        return cls(
            mode=mode,
            command=command,
            function=function,
            setup=opt_str("setup"),
            cpus_per_task=opt_num("cpus_per_task") or 1.0,
            memory_per_task=int(memory) if memory is not None else None,
            timeout=opt_num("timeout"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
