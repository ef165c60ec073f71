"""The reserve file follows ``[storage] reserve_bytes`` across restarts:
an operator who sets it to 0 ("no reserve") gets the room back, and one
who changes its size gets a reserve of that size. Real servers on a real
data dir (a roomy disk: only the config decides)."""

from __future__ import annotations

from pathlib import Path

from serverproc import BlobdServer

MiB = 1 << 20


def test_the_reserve_follows_reserve_bytes_across_restarts(tmp_path: Path) -> None:
    config = {"storage": {"fsync": False, "min_free_bytes": 0, "reserve_bytes": MiB}}
    with BlobdServer(tmp_path, config) as server:
        # In place before the server answers: made at start-up, not beside
        # the first requests (a CI run once found its temporary file in
        # tmp/ just after the start).
        reserve = server.data_dir / "reserve"
        assert reserve.stat().st_size == MiB
        assert list((server.data_dir / "tmp").iterdir()) == []

        server.stop()
        server.config["storage"]["reserve_bytes"] = 2 * MiB
        server.start()
        assert reserve.stat().st_size == 2 * MiB
        assert reserve.stat().st_blocks * 512 >= 2 * MiB    # allocated, not sparse

        server.stop()
        server.config["storage"]["reserve_bytes"] = 0
        server.start()
        assert not reserve.exists(), "the reserve file removed (0: no reserve)"
