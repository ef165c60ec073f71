"""The unit files in systemd/, checked by systemd's own tools.

These tests need systemd-analyze and systemd-sysusers (Debian package
`systemd`). They fail, never skip, when it is missing: an unchecked unit
file is exactly what they exist to prevent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import b3
from serverproc import BlobdServer, descendants, http

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
INSTALLED_EXEC = "ExecStart=/opt/blobd/venv/bin/blobd serve -c /etc/blobd/blobd.toml"

# Measured with systemd 252: 1.1 ("OK"; 0 is best, 10 worst). The score is
# rounded to 0.1 and most single protections weigh less than that, so the
# per-check test below is the fine-grained guard; this one catches the big
# ones (no CapabilityBoundingSet= alone gives 2.8).
EXPOSURE_THRESHOLD = 1.1

# The checks `systemd-analyze security` still flags, each for a reason:
ACCEPTED_EXPOSURES = {
    "PrivateNetwork=",  # a network server
    "RestrictAddressFamilies=~AF_(INET|INET6)",  # ditto, and the S3 mirror
    "RestrictAddressFamilies=~AF_UNIX",  # sd_notify, asyncio's socketpair
    "IPAddressDeny=",  # LAN/VPN clients, off-site S3; see the unit's comment
    "RootDirectory=/RootImage=",  # blobd runs from the host's Python
    "DeviceAllow=",  # ProtectClock= itself grants char-rtc:r
}


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin")
    if path is None:
        pytest.fail(f"{name} not found: install it with `apt-get install systemd`")
    return path


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units as installed, with ExecStart pointing at this Python.

    `systemd-analyze verify` refuses an ExecStart binary that does not exist,
    and /opt/blobd/venv/bin/blobd does not exist on a test machine.
    """
    text = (UNITS / "blobd.service").read_text()
    assert text.count(INSTALLED_EXEC) == 1, "ExecStart changed; update INSTALLED_EXEC"
    here = f"ExecStart={sys.executable} -m blobd serve -c /etc/blobd/blobd.toml"
    (tmp_path / "blobd.service").write_text(text.replace(INSTALLED_EXEC, here))
    shutil.copy(UNITS / "blobd.socket", tmp_path / "blobd.socket")
    return tmp_path


def _verify(*units: Path) -> tuple[int, list[str]]:
    """Exit code and every output line that mentions one of `units`.

    verify exits 0 even for "Unknown key ... ignoring", so the lines are
    what matter; lines about the host's own units are not ours to judge.
    """
    result = _run(_tool("systemd-analyze"), "verify", "--man=no", *map(str, units))
    names = [u.name for u in units] + [str(u) for u in units]
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if any(n in line for n in names)]


def test_verify_service_and_socket(unit_dir: Path):
    code, complaints = _verify(unit_dir / "blobd.service", unit_dir / "blobd.socket")
    assert code == 0
    assert complaints == []


def test_readme_installs_blobd_where_the_unit_runs_it():
    """The README's install steps put blobd exactly where ExecStart looks."""
    venv = INSTALLED_EXEC.removeprefix("ExecStart=").split("/bin/blobd ")[0]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install on a home server"):]
    assert f"sudo python3 -m venv {venv}\n" in section
    assert f"sudo {venv}/bin/pip install ." in section
    assert f"{venv}/bin/blobd token create -c /etc/blobd/blobd.toml" in section
    assert 'data_dir = "/var/lib/blobd"' in section
    assert "\nStateDirectory=blobd\n" in (UNITS / "blobd.service").read_text()


def test_verify_reports_a_broken_unit(unit_dir: Path):
    """The check above can fail: a typo'd key is reported."""
    service = unit_dir / "blobd.service"
    service.write_text(service.read_text().replace("PrivateTmp=", "PrivatTmp=", 1))
    _, complaints = _verify(service)
    assert any("PrivatTmp" in line for line in complaints), complaints


def test_verify_rejects_a_missing_binary(tmp_path: Path):
    """Why the fixture rewrites ExecStart: verify checks the binary exists."""
    shutil.copy(UNITS / "blobd.service", tmp_path / "blobd.service")
    _, complaints = _verify(tmp_path / "blobd.service")
    assert any("/opt/blobd/venv/bin/blobd" in line for line in complaints), complaints


def _security(unit: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(_tool("systemd-analyze"), "security", "--offline=true", *extra, str(unit))


def _exposure(unit: Path) -> float:
    result = _security(unit)
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def _flagged(unit: Path) -> set[str]:
    """Names of the checks that count against the unit."""
    checks = json.loads(_security(unit, "--json=short").stdout)
    assert len(checks) > 60, "systemd-analyze ran fewer checks than expected"
    return {c["name"] for c in checks if not c["set"] and c["exposure"] is not None}


def test_security_exposure_stays_low():
    assert _exposure(UNITS / "blobd.service") <= EXPOSURE_THRESHOLD


def test_security_flags_only_the_accepted_exposures():
    flagged = _flagged(UNITS / "blobd.service")
    assert flagged <= ACCEPTED_EXPOSURES, f"newly exposed: {flagged - ACCEPTED_EXPOSURES}"


@pytest.mark.parametrize(
    "line",
    ["MemoryDenyWriteExecute=yes", "ProtectSystem=strict", "PrivateUsers=yes",
     "SystemCallFilter=~@privileged @resources", "ProtectProc=invisible"],
)
def test_security_notices_a_dropped_protection(tmp_path: Path, line: str):
    """The checks above can fail: dropping any one protection is caught."""
    text = (UNITS / "blobd.service").read_text()
    assert f"\n{line}\n" in text
    weakened = tmp_path / "blobd.service"
    weakened.write_text(text.replace(f"\n{line}\n", "\n"))
    assert _flagged(weakened) - ACCEPTED_EXPOSURES
    if line != "MemoryDenyWriteExecute=yes":  # weighs < 0.05: hidden by rounding
        assert _exposure(weakened) > EXPOSURE_THRESHOLD


def test_sysusers_creates_the_service_user(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    result = _run(_tool("systemd-sysusers"), f"--root={tmp_path}", str(UNITS / "blobd.sysusers"))
    assert result.returncode == 0, result.stderr
    users = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()]
    (blobd,) = [u for u in users if u[0] == "blobd"]
    assert int(blobd[2]) < 1000, "must be a system user"
    assert blobd[5] == "/var/lib/blobd"
    assert blobd[6].endswith("nologin")
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert any(g.startswith("blobd:") for g in groups)
    service = (UNITS / "blobd.service").read_text()
    assert "\nUser=blobd\n" in service and "\nGroup=blobd\n" in service


# The blobd stack in a child process that first forbids itself writable+
# executable memory (PR_SET_MDWE, the kernel's form of MemoryDenyWriteExecute
# that systemd >= 253 uses; 252 uses an equivalent seccomp filter). If
# CPython or an extension module needed a W^X exception, this would fail.
W_X_CHILD = textwrap.dedent(
    """
    import ctypes, mmap
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise SystemExit(f"PR_SET_MDWE failed (kernel >= 6.3 needed): errno {ctypes.get_errno()}")
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        pass
    else:
        raise SystemExit("W+X mapping was allowed: MDWE is not in force")

    import asyncio, hashlib, io, sqlite3
    import aiohttp, aiosqlite, blake3, mutagen.wave, prometheus_client
    from aiohttp import web

    async def main():
        async def hello(request):
            return web.Response(body=blake3.blake3(b"blob").hexdigest().encode())
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                body = await resp.text()
        await runner.cleanup()
        assert body == blake3.blake3(b"blob").hexdigest()
        async with aiosqlite.connect(":memory:") as db:
            await db.execute("create table t (x)")
            await db.execute("insert into t values (?)", (hashlib.sha256(b"x").hexdigest(),))
            assert (await (await db.execute("select count(*) from t")).fetchone()) == (1,)
        prometheus_client.generate_latest()
        print("ok")

    asyncio.run(main())
    """
)


def test_python_stack_needs_no_writable_executable_memory():
    result = _run(sys.executable, "-c", W_X_CHILD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"


# The unit's ProtectProc=invisible and ProcSubset=pid, as a mount of /proc.
_PROC_AS_THE_UNIT_SETS_IT = (
    'mount -t proc -o subset=pid,hidepid=invisible proc /proc && '
    'test ! -e /proc/stat && exec "$@"')


def test_blobd_needs_nothing_in_proc_beyond_its_own_processes(tmp_path: Path) -> None:
    """ProcSubset=pid hides all of /proc but the process directories (no
    /proc/stat, /proc/meminfo, /proc/sys). Under such a /proc, in a mount
    and PID namespace of its own, blobd with two workers serves, stores a
    small and a large body, reads them back, answers /metrics, replaces a
    killed worker and stops cleanly."""
    # unshare does not pass SIGTERM on: the test signals the supervisor
    # itself; should it fail first, unshare's death takes the namespace.
    wrapper = [_tool("unshare"), "--mount", "--pid", "--fork", "--kill-child=SIGKILL",
               "--propagation", "private", "sh", "-c", _PROC_AS_THE_UNIT_SETS_IT, "sh"]
    with BlobdServer(tmp_path, {"server": {"workers": 2}}, wrapper=wrapper) as server:
        token = server.token("alice", "read,write,admin")
        bodies = [os.urandom(70_000), os.urandom(9 << 20)]
        for body in bodies:
            status, _ = http("POST", f"{server.url}/blobs", token, body)
            assert status == 201
        for body in bodies:
            assert http("GET", f"{server.url}/blobs/{b3(body)}", token) == (200, body)
        status, metrics = http("GET", f"{server.url}/metrics", token)
        assert status == 200 and b"blobd_http_requests_total" in metrics
        workers = [p for p in descendants(server.proc.pid)
                   if _cmdline(p).startswith(sys.executable.encode())]
        assert len(workers) == 3  # the supervisor and two workers
        os.kill(max(workers), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while b"replacing it" not in server.stderr_path.read_bytes():
            assert time.monotonic() < deadline, server.stderr_tail()
            time.sleep(0.1)
        assert http("GET", f"{server.url}/blobs/{b3(bodies[0])}", token) == (200, bodies[0])
        os.kill(min(workers), signal.SIGTERM)  # the supervisor, forked first
        assert server.proc.wait(20) == 0  # unshare exits as its child did
    assert b"all workers stopped" in server.stderr_path.read_bytes()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
