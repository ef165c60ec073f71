"""``[server] tls_cert``/``tls_key``: HTTPS straight from blobd, for LANs
without a reverse proxy. A throwaway self-signed certificate from the
``openssl`` command; the client trusts exactly that certificate."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import blake3
import pytest

from blobd.http.takeover import MIN_SIZE
from serverproc import BlobdServer, free_port, run_blobd, to_toml


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl not found: apt-get install openssl")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return context


def fetch(url: str, context: ssl.SSLContext, method: str = "GET", *,
          data: bytes | None = None, headers: dict[str, str] | None = None
          ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=15, context=context) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_https_upload_download_and_ranges(tmp_path: Path, certificate):
    cert, key = certificate
    config = {"server": {"tls_cert": str(cert), "tls_key": str(key)},
              "storage": {"fsync": False}}
    context = client_context(cert)
    # Bigger than the 256 KiB chunks of the non-sendfile path, and uneven.
    data = os.urandom((3 << 20) + 12345)
    digest = blake3.blake3(data).hexdigest()
    with BlobdServer(tmp_path, config, tls=context) as server:
        assert server.url.startswith("https://")
        auth = {"Authorization": f"Bearer {server.token('alice')}"}
        status, _, _ = fetch(f"{server.url}/blobs/{digest}", context, "PUT",
                             data=data, headers=auth)
        assert status == 201
        status, _, body = fetch(f"{server.url}/blobs/{digest}", context, headers=auth)
        assert status == 200 and body == data
        # A body large enough to be read off a plain socket is received by
        # aiohttp over TLS, which decrypts it (read raw, it would not match).
        large = os.urandom(MIN_SIZE + 1)
        large_url = f"{server.url}/blobs/{blake3.blake3(large).hexdigest()}"
        assert fetch(large_url, context, "PUT", data=large, headers=auth)[0] == 201
        assert fetch(large_url, context, headers=auth)[2] == large
        for spec, start, end in [("bytes=1000-300000", 1000, 300001),
                                 ("bytes=262140-", 262140, len(data)),
                                 ("bytes=-70000", len(data) - 70000, len(data))]:
            status, headers, body = fetch(f"{server.url}/blobs/{digest}", context,
                                          headers={**auth, "Range": spec})
            assert status == 206, spec
            assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
            assert body == data[start:end], spec
        # Plain HTTP on the TLS port gets no answer of ours.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as failed:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        assert not isinstance(failed.value, urllib.error.HTTPError)
        # A client that does not trust the certificate is refused by TLS itself.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{server.url}/healthz", timeout=5,
                                   context=ssl.create_default_context())
        server.terminate()
    log = server.stderr_path.read_text()
    whole = next(line for line in log.splitlines() if f"GET /blobs/{digest} 200" in line)
    sent = int(whole.split(" out=")[1].split()[0])
    assert len(data) < sent < len(data) + 1024, whole


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("which", ["tls_cert", "tls_key"])
def test_unusable_certificate_is_one_line(tmp_path: Path, certificate, which: str,
                                          workers: int):
    cert, key = certificate
    server = {"port": free_port(), "data_dir": str(tmp_path / "data"),
              "tls_cert": str(cert), "tls_key": str(key), "workers": workers}
    server[which] = str(tmp_path / "missing.pem")
    config = tmp_path / "blobd.toml"
    config.write_text(to_toml({"server": server}))
    result = run_blobd("serve", "-c", str(config), cwd=tmp_path, timeout=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("blobd: error: server.tls_cert: cannot load")
    assert "missing.pem" in lines[0]


def test_an_encrypted_key_is_one_line_not_a_passphrase_prompt(tmp_path: Path, certificate):
    cert, key = certificate
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", str(encrypted),
                    "-aes256", "-passout", "pass:secret"], check=True, capture_output=True,
                   timeout=60)
    config = tmp_path / "blobd.toml"
    config.write_text(to_toml({"server": {
        "port": free_port(), "data_dir": str(tmp_path / "data"),
        "tls_cert": str(cert), "tls_key": str(encrypted)}}))
    # stdin from the terminal would make OpenSSL ask and wait; here it is
    # empty, and the answer must be an error naming the key either way.
    result = run_blobd("serve", "-c", str(config), cwd=tmp_path, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "blobd: error: server.tls_key: the key is encrypted; blobd needs it unencrypted"
        " (e.g. openssl pkey -in KEY -out KEY.plain)"]
