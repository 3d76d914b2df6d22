"""The service's configuration: the one :class:`Settings` shared with the workers.

Defined in :mod:`workers.settings` (workers may not import ``service``) and re-exported
here so that service code and users find it where they expect it.
"""

from __future__ import annotations

from workers.settings import DEFAULT_BROKER_URL, Settings, get_settings

__all__ = ["DEFAULT_BROKER_URL", "Settings", "get_settings"]
