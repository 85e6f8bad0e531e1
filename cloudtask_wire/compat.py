"""What the wire needs of Python 3.10+ on the 3.9 of cloud images (the agent's compat builds on it)."""

from __future__ import annotations

import sys
from typing import Any

# @dataclass(**SLOTS): slots (less memory per message, faster attributes) where dataclass has them.
SLOTS: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}

__all__ = ["SLOTS"]
