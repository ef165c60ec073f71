"""The reserve file follows ``[storage] reserve_bytes`` across restarts:
an operator who sets it to 0 ("no reserve") gets the room back, and one
who changes its size gets a reserve of that size. Real servers on a real
data dir (a roomy disk: only the config decides)."""

from __future__ import annotations

from pathlib import Path

from serverproc import BlobdServer, wait_until

MiB = 1 << 20


def test_the_reserve_follows_reserve_bytes_across_restarts(tmp_path: Path) -> None:
    config = {"storage": {"fsync": False, "min_free_bytes": 0, "reserve_bytes": MiB}}
    with BlobdServer(tmp_path, config) as server:
        reserve = server.data_dir / "reserve"
        wait_until(reserve.exists, "the reserve file")
        assert reserve.stat().st_size == MiB

        server.stop()
        server.config["storage"]["reserve_bytes"] = 2 * MiB
        server.start()
        wait_until(lambda: reserve.exists() and reserve.stat().st_size == 2 * MiB,
                   "the reserve file at its new size")
        assert reserve.stat().st_blocks * 512 >= 2 * MiB    # allocated, not sparse

        server.stop()
        server.config["storage"]["reserve_bytes"] = 0
        server.start()
        wait_until(lambda: not reserve.exists(), "the reserve file removed (0: no reserve)")
