"""Typed keys for what the application and requests carry."""

from __future__ import annotations

from aiohttp import web

from ..auth import Principal
from ..store import Store

STORE = web.AppKey("store", Store)
PRINCIPAL = web.RequestKey("principal", Principal)  # the authenticated caller

__all__ = ["STORE", "PRINCIPAL", "Principal"]
