"""The HTTP API: one module per resource, assembled in :mod:`blobd.http.app`."""
