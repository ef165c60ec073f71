"""The S3-compatible mirror: every blob copied to a bucket, so a dead disk
loses nothing.

* :mod:`.queue`   the durable outbox in SQLite, written with each commit
* :mod:`.worker`  drains it in the background of a running server
* :mod:`.heal`    fetches back a blob whose local file is missing or damaged
* :mod:`.backup`  consistent snapshots of the index, kept in the bucket
* :mod:`.sync`    ``blobd mirror sync``: rsync-style reconciliation
* :mod:`.restore` ``blobd mirror restore``: an empty server rebuilt from the bucket
* :mod:`.service` the parts a running server starts and stops
* :mod:`.common`  the target, listings, verification of copies, a job pool

Object keys come from :mod:`blobd.layout` alone; the bucket is reached
through :class:`blobd.storage.s3.S3Target`, which needs the optional
``s3`` extra (aiobotocore), imported only when a mirror is configured.
"""
