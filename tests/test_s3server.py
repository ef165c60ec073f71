"""The SeaweedFS test server helper itself: ports, addresses, failures, restarts."""

import re
import socket
import subprocess
from pathlib import Path

import pytest

from s3server import DISABLED_PORT_OPTIONS, PORT_OPTIONS, SeaweedS3, find_weed


def weed_mini_port_options() -> dict[str, str | None]:
    """Every `-…port…` option of `weed mini -h`, with its printed default."""
    text = subprocess.run(
        [find_weed(), "mini", "-h"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ).stdout
    options: dict[str, str | None] = {}
    for match in re.finditer(r"^  -(\S+) int\n\s+(.*)$", text, re.MULTILINE):
        name, description = match.groups()
        if "port" in name.lower():
            default = re.search(r"\(default:? ([^)]*)\)", description)
            options[name] = default.group(1) if default else None
    return options


def test_every_port_with_a_default_is_given_a_free_one():
    options = weed_mini_port_options()
    assert "s3.port" in options, "could not read `weed mini -h`"
    ours = set(PORT_OPTIONS) | set(DISABLED_PORT_OPTIONS)
    # Options without a printed default default to 0, which keeps them off.
    fixed = {name for name, default in options.items() if default is not None}
    assert fixed <= ours, f"weed mini has port options we leave at their default: {fixed - ours}"
    assert ours <= set(options), f"options weed mini no longer has: {ours - set(options)}"


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = fd.readlink() if fd.is_symlink() else Path()
        found = re.fullmatch(r"socket:\[(\d+)\]", str(target))
        if found:
            inodes.add(found.group(1))
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:
                address, port = local.split(":")
                listening.add((_decode_address(address), int(port, 16)))
    return listening


def _decode_address(hex_address: str) -> str:
    if len(hex_address) == 8:  # IPv4, little-endian
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_address)[::-1])
    return "ipv6:" + hex_address


def test_listens_on_loopback_on_its_own_ports_only(s3server):
    listening = listening_sockets(s3server.pid)

    assert ("127.0.0.1", s3server.ports["s3.port"]) in listening
    assert {address for address, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= set(s3server.ports.values())


def test_failed_start_shows_the_log_and_data_survives_a_kill(tmp_path):
    server = SeaweedS3(tmp_path / "weed")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", server.ports["s3.port"]))
    blocker.listen()
    try:
        with pytest.raises(RuntimeError) as caught:
            server.start()
        assert "weed.log" in str(caught.value)
        assert str(server.ports["s3.port"]) in str(caught.value)
        assert not server.running
    finally:
        blocker.close()

    server.start()
    try:
        client = server.client()
        client.put_object(Bucket=server.bucket, Key="survivor", Body=b"still here")
        server.kill()
        assert not server.running
        server.start()
        assert client.get_object(Bucket=server.bucket, Key="survivor")["Body"].read() == b"still here"
    finally:
        server.stop()
    assert not server.running
