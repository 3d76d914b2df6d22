"""A multipart part's filename, whatever its script: raw UTF-8 or RFC 5987 ``filename*``.

Header values arrive as bytes and are kept one Latin-1 character per byte
(:mod:`service.uploads`), so that they are decoded exactly once, here: a browser sends a
filename raw in UTF-8 inside the quotes of ``filename="..."``; RFC 5987/6266 clients send
``filename*=UTF-8''<percent-encoded>``, which wins. (python-multipart's own parser ignores
``filename*``, and re-encoding a UTF-8-decoded header as Latin-1 failed with a 500 for
any name outside Latin-1.)
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from python_multipart.multipart import parse_options_header

#: ``filename*=charset'lang'percent-encoded`` (RFC 5987 / RFC 6266), in a Content-Disposition
_EXTENDED_FILENAME = re.compile(r"""filename\*\s*=\s*"?([^'";\s]*)'[^']*'([^";\s]*)"?""", re.I)


def _decode_name(raw: bytes) -> str:
    """Raw filename bytes as text: UTF-8 (what browsers send), else Latin-1 (RFC 2616)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _extended_filename(disposition: str) -> str | None:
    """The RFC 5987 ``filename*`` parameter, when present and decodable."""
    found = _EXTENDED_FILENAME.search(disposition)
    if found is None:
        return None
    charset, value = found.group(1).lower() or "utf-8", found.group(2)
    if charset not in ("utf-8", "iso-8859-1", "us-ascii"):
        return None
    try:
        return unquote(value, encoding=charset, errors="strict")
    except (UnicodeDecodeError, LookupError):
        return None


def part_filename(headers: dict[str, str]) -> str | None:
    """A part's filename: ``filename*`` (RFC 5987) over ``filename``, any Unicode."""
    disposition = headers.get("content-disposition", "")  # one latin-1 char per byte
    extended = _extended_filename(disposition)
    if extended is not None:
        return extended
    _, options = parse_options_header(disposition)
    raw = options.get(b"filename")
    return None if raw is None else _decode_name(raw)
