"""Typed keys for what the application and requests carry."""

from __future__ import annotations

from aiohttp import web

from ..auth import Principal
from ..mirror.service import Mirror
from ..store import Store

STORE = web.AppKey("store", Store)
MIRROR = web.AppKey("mirror", Mirror)  # present only when [mirror] is configured
PRINCIPAL = web.RequestKey("principal", Principal)  # the authenticated caller

__all__ = ["STORE", "MIRROR", "PRINCIPAL", "Principal"]
