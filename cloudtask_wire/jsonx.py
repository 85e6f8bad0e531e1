"""JSON encode/decode: orjson when installed (much faster), the stdlib otherwise.

Both return/accept compact UTF-8 text so the two are interchangeable on the wire.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised on instances without orjson
    _orjson = None  # type: ignore[assignment]


def dumps(obj: Any) -> str:
    if _orjson is not None:
        return _orjson.dumps(obj).decode()
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def loads(text: str | bytes) -> Any:
    if _orjson is not None:
        return _orjson.loads(text)
    return json.loads(text)


JSONDecodeError: type[ValueError] = _orjson.JSONDecodeError if _orjson is not None else json.JSONDecodeError
