"""Config values as a user writes them back into the TOML file.

A message that says what to write (``write prefix = "..."``) must hold
text that TOML reads as the value meant: TOML forbids raw control
characters in a string (json.dumps leaves DEL raw), and a C1 or other
control character would be invisible in the log line anyway, so every one
is written as an escape.
"""

from __future__ import annotations

import re
import unicodedata

_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
          "\r": "\\r"}


def string(text: str) -> str:
    """``text`` as a TOML basic string."""
    return '"' + "".join(_SHORT.get(c) or (f"\\u{ord(c):04x}"
                                           if unicodedata.category(c) == "Cc" else c)
                         for c in text) + '"'


def key(text: str) -> str:
    """``text`` as a TOML key: bare when it can be, else quoted."""
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else string(text)
