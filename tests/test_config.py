"""Loading the TOML config: defaults, sizes, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobd.config import Config, config_from_dict, load_config, override_server, parse_size
from blobd.errors import ConfigError
from blobd.sniff import AUDIO_MIME_TYPES
from serverproc import run_blobd

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_embedded_default():
    config = load_config(None)
    assert config.server.host == "127.0.0.1" and config.server.port == 8420
    assert config.server.data_dir == "./blobd-data"
    assert config.storage.fsync is True and config.mirror is None
    assert config.gc.grace_seconds == 0


@pytest.mark.parametrize("text,value", [
    (1024, 1024), ("1024", 1024), ("512MiB", 512 << 20), ("2GiB", 2 << 30),
    ("1.5 KiB", 1536), ("1TiB", 1 << 40), ("10MB", 10_000_000), ("7 b", 7),
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("raw,key", [
    ({"storage": {"fsink": True}}, "storage.fsink"),
    ({"storage": {"fsync": "yes"}}, "storage.fsync"),
    ({"limits": {"max_blob_size": "2 furlongs"}}, "limits.max_blob_size"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"port": "80"}}, "server.port"),
    ({"quotas": {"default": {"max_bytes": -1}}}, "quotas.default.max_bytes"),
    ({"quotas": {"bob": {"max_blobs": "many"}}}, "quotas.bob.max_blobs"),
    ({"mirror": {"bucket": "b"}}, "mirror.endpoint"),
    ({"mirror": {"endpoint": "http://h", "bucket": "b", "backups_kept": 0}},
     "mirror.backups_kept"),
    ({"mirror": {"endpoint": "http://h", "bucket": "b", "heal_timeout_seconds": 0}},
     "mirror.heal_timeout_seconds"),
    ({"mirror": {"endpoint": "http://h", "bucket": "b", "abandoned_upload_hours": 0}},
     "mirror.abandoned_upload_hours"),
    ({"mirror": {"endpoint": "http://h", "bucket": "b", "retry_max_seconds": 0}},
     "mirror.retry_max_seconds"),
    ({"nonsense": {}}, "nonsense"),
    ({"audio": {"allowed_types": ["audio/mpeg", "audio/x-wav"]}}, "audio.allowed_types"),
    ({"audio": {"allowed_types": "audio/mpeg"}}, "audio.allowed_types"),
    ({"audio": {"require_audio": True, "allowed_types": []}}, "audio.allowed_types"),
    ({"audio": {"probe_timeout_seconds": 0}}, "audio.probe_timeout_seconds"),
    ({"gc": {"sweep_interval_seconds": 0}}, "gc.sweep_interval_seconds"),
    ({"gc": {"sweep_interval_seconds": -5}}, "gc.sweep_interval_seconds"),
    ({"quotas": {"default": {"max_blobs": -1}}}, "quotas.default.max_blobs"),
    ({"quotas": {"bob": {"max_refs": "1KiB"}}}, "quotas.bob.max_refs"),
    ({"uploads": {"max_sessions_per_owner": -1}}, "uploads.max_sessions_per_owner"),
    ({"server": {"shutdown_timeout_seconds": -1}}, "server.shutdown_timeout_seconds"),
    ({"server": {"shutdown_timeout_seconds": float("inf")}}, "server.shutdown_timeout_seconds"),
    ({"limits": {"max_blob_size": "99999999999 TiB"}}, "limits.max_blob_size"),
    ({"limits": {"max_blob_size": "1" * 400 + "KiB"}}, "limits.max_blob_size"),
    ({"mirror": {"endpoint": "127.0.0.1:9000", "bucket": "b"}}, "mirror.endpoint"),
    ({"mirror": {"endpoint": "ftp://h", "bucket": "b"}}, "mirror.endpoint"),
    # Found by review: the S3 client's validation error, over several lines,
    # at every start and in `blobd mirror status`.
    ({"mirror": {"endpoint": "http://h", "bucket": "blobd/blobs"}},
     "mirror.bucket: 'blobd/blobs' is not a bucket name"),
    ({"mirror": {"endpoint": "http://h", "bucket": "s3://blobd"}}, "mirror.bucket"),
    ({"mirror": {"endpoint": "http://h", "bucket": "b", "multipart_threshold": 0}},
     "mirror.multipart_threshold"),
    # Found by review: these hosts were tracebacks at start-up, or (empty)
    # every interface without a word.
    ({"server": {"host": ""}}, "server.host: empty; to listen on every interface, say 0.0.0.0"),
    ({"server": {"host": "[::1]"}}, "server.host: '[::1]': an IPv6 address goes without"),
    # Found by review: the resolver reads these as 0.0.0.0 and 192.168.1.8.
    ({"server": {"host": "1.2.3.4.5"}}, "server.host: '1.2.3.4.5' is not an IPv4 address"),
    ({"server": {"host": "256.1.1.1"}}, "server.host: '256.1.1.1' is not an IPv4 address"),
    ({"server": {"host": "192.168.1.10 "}}, "server.host: '192.168.1.10 ' is neither"),
    ({"server": {"host": "not a host"}}, "server.host: 'not a host' is neither"),
    ({"server": {"host": "-lead.example"}}, "server.host"),
    ({"server": {"host": "a" * 64}}, "server.host"),
    # Found by review: a traceback, or accepted although they could never
    # work (a quota no owner can have, origins no browser sends, no
    # session at all, the working directory as the store).
    ({"quotas": {"default": 5}}, "quotas.default: expected a table"),
    ({"quotas": {"bad owner!": {"max_blobs": 5}}}, "quotas.bad owner!: not an owner name"),
    ({"quotas": {"x" * 65: {"max_blobs": 5}}}, "quotas." + "x" * 65 + ": not an owner name"),
    ({"server": {"cors_origins": ["nas.local:3000"]}},
     "server.cors_origins: 'nas.local:3000' is not an origin"),
    ({"server": {"cors_origins": ["http://nas.local:3000//"]}}, "server.cors_origins"),
    ({"server": {"cors_origins": ["http://nas.local/app"]}}, "server.cors_origins"),
    ({"server": {"cors_origins": ["http://nas.local:99999"]}}, "server.cors_origins"),
    ({"server": {"cors_origins": ["*", "http://"]}}, "server.cors_origins"),
    ({"server": {"data_dir": ""}}, "server.data_dir: empty"),
    # Found by review: forked workers until the machine stalled.
    ({"server": {"workers": 1000}}, "server.workers: expected at most 64"),
    ({"server": {"workers": 10**20}}, "server.workers: expected at most 64"),
    # Found by review: a store in ./~/blobd-data.
    ({"server": {"data_dir": "~/blobd-data"}}, "server.data_dir: '~/blobd-data': '~' is not"),
    # Found by review: keys S3-compatible stores disagree on (some collapse
    # "//" or resolve "..", some refuse them).
    *(({"mirror": {"endpoint": "http://h", "bucket": "b", "prefix": prefix}},
       f"mirror.prefix: {prefix!r} ")
          for prefix in ("a/../b", "./a", "..", "a/.", "/./", "a//../b", "a\x00b")),
])
def test_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value).startswith(key)


@pytest.mark.parametrize("bucket", [
    "blobd", "my_bucket.v2",
    # An access point ARN, which the S3 client takes as a bucket (it was
    # refused at start-up by the name check).
    "arn:aws:s3:eu-west-1:123456789012:accesspoint/blobd",
])
def test_buckets_the_s3_client_takes(bucket):
    config = config_from_dict({"mirror": {"endpoint": "http://h", "bucket": bucket}})
    assert config.mirror.bucket == bucket


@pytest.mark.parametrize("good, bad", [
    ("", "/./"), ("blobs", "blobs/./"), ("blobd/", "blobd/../"), ("home/blobd", "home/./blobd"),
    # Slashes at either end were always dropped from the keys: configs that
    # wrote them keep working.
    ("/blobd/", "/blob/./d/"), ("/", "/a/../b/"),
    ("home/blobd/", "home/./blobd/"), ("a/..b", "a/../b"),
    ("musique/été", "musique/\x00té"),
])
def test_mirror_prefix_takes_plain_names_and_refuses_near_misses(good, bad):
    """Found by review: any prefix was taken, and one S3-compatible store
    made different keys of it than another. Slashes at either end are fine
    (the keys drop them), as are the docs' and the tests' prefixes."""
    section = {"endpoint": "http://h", "bucket": "b"}
    assert config_from_dict({"mirror": {**section, "prefix": good}}).mirror.prefix == good
    with pytest.raises(ConfigError) as info:
        config_from_dict({"mirror": {**section, "prefix": bad}})
    assert str(info.value).startswith(f"mirror.prefix: {bad!r} ")


def test_a_mirror_prefix_too_long_for_s3_keys_is_refused():
    """S3 object keys stop at 1,024 bytes of UTF-8, and the mirror's longest
    are its index backups': <prefix>/_index/index-<stamp>-<store id>.sqlite3,
    77 bytes after the prefix's '/'. A prefix that makes them longer was
    taken, and every backup failed. Slashes at either end do not count (the
    keys drop them); a multibyte name counts in bytes."""
    section = {"endpoint": "http://h", "bucket": "b"}
    longest = "a/" * 472 + "ab"         # 946 bytes: backups' keys of 1,024
    assert config_from_dict({"mirror": {**section, "prefix": longest}}).mirror.prefix
    assert config_from_dict({"mirror": {**section, "prefix": f"/{longest}/"}}).mirror.prefix
    for prefix, size in ((longest + "c", 947), ("é" * 473 + "/", 946), ("é" * 474, 948)):
        if size <= 946:
            assert config_from_dict({"mirror": {**section, "prefix": prefix}})
            continue
        with pytest.raises(ConfigError) as info:
            config_from_dict({"mirror": {**section, "prefix": prefix}})
        assert str(info.value) == (
            f"mirror.prefix: {prefix!r} is {size} bytes (UTF-8), which makes the keys of the"
            " index backups (<prefix>/_index/index-<stamp>-<store id>.sqlite3)"
            f" {size + 78} bytes, over S3's limit of 1024 bytes per object key; expected at"
            " most 946 bytes"), str(info.value)


def test_a_bad_mirror_prefix_stops_a_command_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[mirror]\nendpoint = "http://h"\nbucket = "b"\nprefix = "a/../b"\n')
    result = run_blobd("mirror", "status", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("blobd: error: mirror.prefix: 'a/../b' has a '..'"
                                    " segment"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1%eth0",
                                  "localhost", "nas.local", "my-nas.lan.", "a_b"])
def test_hosts_that_listen(host):
    assert config_from_dict({"server": {"host": host}}).server.host == host


@pytest.mark.parametrize("flags, message", [
    ({"port": 99999}, "--port: expected 1-65535"),
    ({"port": 0}, "--port: expected 1-65535"),
    ({"host": "[::1]"}, "--host: '[::1]': an IPv6 address goes without brackets (::1)"),
    ({"host": ""}, "--host: empty; to listen on every interface, say 0.0.0.0 (IPv4) or ::"),
])
def test_command_line_overrides_are_checked_as_the_file_is(flags, message):
    """Found by review: --port and --host replaced checked values unchecked
    (--port 0 served on a random port, --port 99999 was a traceback)."""
    with pytest.raises(ConfigError) as info:
        override_server(config_from_dict({}), flags)
    assert str(info.value).startswith(message)
    assert override_server(config_from_dict({}), {"port": 8421}).server.port == 8421


def test_allowed_types_default_to_every_recognised_type():
    audio = config_from_dict({}).audio
    assert audio.require_audio is False
    assert sorted(audio.allowed_types) == sorted(AUDIO_MIME_TYPES)
    with pytest.raises(ConfigError, match="audio/x-wav not recognised"):
        config_from_dict({"audio": {"allowed_types": ["audio/x-wav"]}})


def test_webm_matroska_and_aiff_are_allowed_types(tmp_path):
    """By their registered names (RFC 9559's audio/matroska, not the
    deprecated audio/x-matroska), by default and in the example config."""
    wanted = {"audio/webm", "audio/matroska", "audio/aiff"}
    assert wanted <= set(config_from_dict({}).audio.allowed_types)
    assert wanted <= set(load_config(EXAMPLE).audio.allowed_types)
    narrowed = config_from_dict({"audio": {"require_audio": True,
                                           "allowed_types": sorted(wanted)}})
    assert sorted(narrowed.audio.allowed_types) == sorted(wanted)
    with pytest.raises(ConfigError, match="audio/x-matroska not recognised"):
        config_from_dict({"audio": {"allowed_types": ["audio/x-matroska"]}})


def test_origins_and_owner_tables_that_work():
    config = config_from_dict({
        "server": {"cors_origins": ["*", "http://nas.local:3000", "https://[::1]:8443",
                                    "app://localhost"]},
        "quotas": {"alice.b@home_x-1": {"max_blobs": 5}}})
    assert config.quota_for("alice.b@home_x-1").max_blobs == 5


def test_an_origin_copied_with_its_slash_is_taken_without_it():
    """Found by the upgrade review: older versions took "http://nas.local:3000/"
    and the checks added since stopped such a server at start-up."""
    config = config_from_dict({"server": {"cors_origins": [
        "http://nas.local:3000/", "https://app.example/", "*"]}})
    assert config.server.cors_origins == ["http://nas.local:3000", "https://app.example", "*"]


def test_an_origin_is_taken_as_a_browser_sends_it():
    """Found by review: the Origin header is compared as a string, and a
    browser sends the scheme and host in lower case and no default port,
    so "HTTPS://NAS.local/" or "https://nas.local:443" was accepted and
    never matched."""
    config = config_from_dict({"server": {"cors_origins": [
        "HTTPS://NAS.Local/", "https://nas.local:443", "http://nas.local:80",
        "http://nas.local:8443", "http://[::1]:3000", "http://[::1]:80"]}})
    assert config.server.cors_origins == [
        "https://nas.local", "https://nas.local", "http://nas.local",
        "http://nas.local:8443", "http://[::1]:3000", "http://[::1]"]


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    """Found by review: it said "File exists"."""
    afile = tmp_path / "afile"
    afile.write_text("")
    config = tmp_path / "blobd.toml"
    config.write_text(f'[server]\ndata_dir = "{afile}"\nport = 8533\n')
    result = run_blobd("serve", "-c", str(config), cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == f"blobd: error: {afile} is not a directory"


def test_per_owner_quota_inherits_the_default():
    config = config_from_dict({"quotas": {"default": {"max_bytes": "1GiB"},
                                          "bob": {"max_blobs": 5}}})
    assert config.quota_for("bob").max_bytes == 1 << 30
    assert config.quota_for("bob").max_blobs == 5
    assert config.quota_for("carol").max_blobs == 1_000_000
    assert config.quota_for("carol").max_refs == 1_000_000


def test_example_config_loads_and_documents_every_key():
    config = load_config(EXAMPLE)
    assert isinstance(config, Config)
    text = EXAMPLE.read_text()
    import dataclasses
    for section in dataclasses.fields(Config):
        if section.name == "notes":  # what start-up logs, not a section
            continue
        value = getattr(Config(), section.name)
        if section.name == "quotas":
            value = value["default"]
        if section.name == "mirror":
            from blobd.config import MirrorConfig
            value = MirrorConfig()
        for key in dataclasses.fields(value):
            assert f"\n{key.name} = " in text or f"\n# {key.name} = " in text, \
                f"config.example.toml does not document {section.name}.{key.name}"


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[logging]\n# caf\xe9\nlevel = "info"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: not valid TOML: not UTF-8"):
        load_config(latin1)


def test_the_scrub_is_on_by_default_and_takes_a_rate_and_a_period():
    assert config_from_dict({}).scrub.bytes_per_second == 16 << 20
    assert config_from_dict({}).scrub.period_seconds == 30 * 86400
    scrub = config_from_dict({"scrub": {"bytes_per_second": "4MiB",
                                        "period_seconds": 3600}}).scrub
    assert (scrub.bytes_per_second, scrub.period_seconds) == (4 << 20, 3600.0)
    assert config_from_dict({"scrub": {"bytes_per_second": 0}}).scrub.bytes_per_second == 0
    for raw, key in (({"period_seconds": 0}, "scrub.period_seconds"),
                     ({"bytes_per_second": "fast"}, "scrub.bytes_per_second"),
                     ({"rate": 1}, "scrub.rate")):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"scrub": raw})
        assert str(info.value).startswith(f"{key}:")


def test_a_multipart_threshold_under_5mib_is_taken():
    """Found by the upgrade review: "1MiB" worked before the 5MiB floor (parts
    are 16 MiB whatever the threshold is) and then stopped a server at start."""
    config = config_from_dict({"mirror": {"endpoint": "http://h", "bucket": "b",
                                          "multipart_threshold": "1MiB"}})
    assert config.mirror.multipart_threshold == 1 << 20


def test_a_tilde_data_dir_holding_an_older_store_names_it(tmp_path, monkeypatch):
    """Found by the upgrade review: an older blobd made "~/blobd-data" in a
    directory named "~"; after the upgrade the refusal said only "give the
    whole path", and the user's home (an empty store) looked like every blob lost."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~" / "blobd-data").mkdir(parents=True)
    (tmp_path / "~" / "blobd-data" / "index.sqlite3").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        config_from_dict({"server": {"data_dir": "~/blobd-data"}})
    assert str(info.value) == (
        "server.data_dir: '~/blobd-data': '~' is not expanded here; give the whole path"
        f" (the store an older blobd made from this setting is {tmp_path}/~/blobd-data:"
        f" write data_dir = \"{tmp_path}/~/blobd-data\")")


# Values older versions took and the checks added since refused: taken
# again, as those versions read them, with a note saying how to write it now.
MIRROR = {"endpoint": "http://h", "bucket": "b"}


@pytest.mark.parametrize("raw, read_as, note", [
    # The resolver read digits and dots as inet_aton(3) does, and listened there.
    ({"server": {"host": "0"}}, ("server", "host", "0.0.0.0"),
     "server.host = '0' is read as 0.0.0.0, as older versions read it; write \"0.0.0.0\""),
    ({"server": {"host": "127.1"}}, ("server", "host", "127.0.0.1"), "write \"127.0.0.1\""),
    ({"server": {"host": "192.168.1.010"}}, ("server", "host", "192.168.1.8"),
     "write \"192.168.1.8\""),
    # Blobs up to it went up in one PUT, as they do up to 5 GiB; bigger ones
    # never went up at all.
    ({"mirror": {**MIRROR, "multipart_threshold": "6GiB"}},
     ("mirror", "multipart_threshold", 5 << 30), "it is taken as \"5GiB\": write that"),
    # The keys keep the prefix as written (the objects mirrored stay found).
    ({"mirror": {**MIRROR, "prefix": "home//blobd/"}}, ("mirror", "prefix", "home//blobd/"),
     "its keys are written as older versions wrote them (home//blobd/ab/cd/<hash>)"),
    ({"mirror": {**MIRROR, "prefix": "a\tb"}}, ("mirror", "prefix", "a\tb"),
     "has a control character ('\\t')"),
    ({"mirror": {**MIRROR, "prefix": "musique/\x85té"}}, ("mirror", "prefix", "musique/\x85té"),
     "has a control character ('\\x85')"),
    # No upload session for anyone, only the empty blob: refusals, as before.
    ({"uploads": {"max_sessions_per_owner": 0}}, ("uploads", "max_sessions_per_owner", 0), None),
    ({"limits": {"max_blob_size": 0}}, ("limits", "max_blob_size", 0), None),
])
def test_values_older_versions_took_are_read_as_they_read_them(raw, read_as, note):
    config = config_from_dict(raw)
    section, key, value = read_as
    assert getattr(getattr(config, section), key) == value
    if note is None:
        assert config.notes == ()
    else:
        assert len(config.notes) == 1 and note in config.notes[0], config.notes


def test_a_prefix_with_an_empty_segment_keeps_the_keys_older_versions_wrote():
    """SeaweedFS folds "a//b/..." into "a/b/...", AWS S3 keeps it: whichever
    the store did, the keys sent must stay those an older blobd sent, or its
    objects would be orphaned on a store that kept them as sent."""
    from blobd.layout import mirror_backup_prefix, mirror_key
    prefix = config_from_dict({"mirror": {**MIRROR, "prefix": "/a//b/"}}).mirror.prefix
    digest = "ab" * 32
    assert mirror_key(prefix, digest) == f"a//b/ab/ab/{digest}"
    assert mirror_backup_prefix(prefix) == "a//b/_index/"


def test_host_0_on_the_command_line_is_read_as_before():
    config = override_server(config_from_dict({}), {"host": "0"})
    assert config.server.host == "0.0.0.0" and "write \"0.0.0.0\"" in config.notes[0]


@pytest.mark.parametrize("raw, message", [
    # A busy loop: a write transaction on every turn of the event loop.
    ({"gc": {"sweep_interval_seconds": 0}},
     "gc.sweep_interval_seconds: expected a positive number; 0 swept without pause, holding"
     " the index's write lock over and over: write 1 to sweep every second"),
    # No token ever had such an owner (the rule never changed).
    ({"quotas": {"Alice Smith": {"max_blobs": 5}}},
     "quotas.Alice Smith: not an owner name (an owner is 1-64 characters from A-Z a-z 0-9"
     " . _ @ -), so its limits never applied to anyone; delete the [quotas.\"Alice Smith\"]"
     " table, or rename it to an owner that `blobd token list` shows"),
    # SeaweedFS refuses such keys (400 to PUT, GET and HEAD): nothing went up.
    ({"mirror": {**MIRROR, "prefix": "a/../b"}},
     "mirror.prefix: 'a/../b' has a '..' segment, which SeaweedFS refuses in a key and other"
     " stores resolve; write prefix = \"b\""),
    ({"mirror": {**MIRROR, "prefix": "home/./blobd/"}}, "; write prefix = \"home/blobd\""),
    ({"mirror": {**MIRROR, "prefix": "a\x00b"}},
     "mirror.prefix: 'a\\x00b' has a NUL character, which no store takes in a key;"
     " write prefix = \"ab\""),
])
def test_old_values_that_never_worked_say_what_to_write(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value), str(info.value)


def test_an_empty_data_dir_holding_an_older_store_names_it(tmp_path, monkeypatch):
    """An older blobd took "" as the working directory: refused still (the
    store it named changed with where a command was run), with the store's
    whole path to write."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "index.sqlite3").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        config_from_dict({"server": {"data_dir": ""}})
    assert str(info.value).endswith(
        f"(the store an older blobd made from this setting is {tmp_path}:"
        f" write data_dir = \"{tmp_path}\")")


def test_a_server_starts_on_an_older_config_and_says_how_to_write_it(tmp_path):
    """`blobd serve` on values the checks added since refused: it starts,
    logs one warning line for each that has a clearer spelling now, and
    means what older versions meant (no upload session, only the empty blob)."""
    import json

    import blake3

    from serverproc import BlobdServer, http

    class OldHost(BlobdServer):
        def _write_config(self) -> None:
            super()._write_config()
            text = self.config_path.read_text().replace('host = "127.0.0.1"', 'host = "127.1"')
            self.config_path.write_text(text)

    old = {"storage": {"fsync": False}, "uploads": {"max_sessions_per_owner": 0},
           "limits": {"max_blob_size": 0},
           # A mirror nobody answers: the server starts, uploads would queue.
           "mirror": {"endpoint": "http://127.0.0.1:9", "bucket": "b", "prefix": "t//b",
                      "multipart_threshold": "6GiB"}}
    with OldHost(tmp_path, old) as server:
        token = server.token()
        assert http("POST", f"{server.url}/blobs", token, b"x")[0] == 413
        assert http("POST", f"{server.url}/blobs", token, b"")[0] == 201
        empty = blake3.blake3(b"").hexdigest()
        for body in ({"size": 0}, {"size": 0, "hash": empty}):
            status, answer = http("POST", f"{server.url}/uploads", token,
                                  json.dumps(body).encode())
            assert status == 507, answer
            assert json.loads(answer)["message"] == (
                "upload sessions are turned off on this server"
                " ([uploads] max_sessions_per_owner = 0); send the blob in one PUT")
        log = server.stderr_path.read_text()
    warnings = [line for line in log.splitlines() if "older versions" in line]
    assert len(warnings) == 3, log
    assert "server.host = '127.1' is read as 127.0.0.1" in warnings[0]
    assert "mirror.multipart_threshold = 6442450944" in warnings[1]
    assert "mirror.prefix = 't//b' has an empty segment" in warnings[2]


@pytest.mark.parametrize("prefix", ["a/../..", "..", "/./", "a//../b", "x/../../y",
                                    "a/..\x00/b", ".\x00./a", "a\x00b"])
def test_the_prefix_a_refusal_says_to_write_is_taken(prefix):
    """Found by review: 'a/../..' said to write ".." and 'a/..<NUL>/b' to
    write "a/../b", each refused in turn."""
    import tomllib

    with pytest.raises(ConfigError) as info:
        config_from_dict({"mirror": {**MIRROR, "prefix": prefix}})
    written = tomllib.loads(str(info.value).split("; write ")[1])["prefix"]
    assert config_from_dict({"mirror": {**MIRROR, "prefix": written}}).mirror.prefix == written


@pytest.mark.parametrize("raw, meant", [
    ({"mirror": {**MIRROR, "prefix": "a//b\x01"}}, "a/b\x01"),
    ({"mirror": {**MIRROR, "prefix": "./a\x7f"}}, "a\x7f"),
    ({"mirror": {**MIRROR, "prefix": "x\x00/\x85y\t"}}, "x/\x85y\t"),
])
def test_a_prefix_to_write_is_valid_toml(raw, meant):
    """Found by review: the prefix to write held its control characters raw
    (DEL and \\x01 among them), which TOML refuses in a string, and which
    the log line showed as nothing."""
    import tomllib

    try:
        message = config_from_dict(raw).notes[0]
    except ConfigError as exc:
        message = str(exc)
    written = message.split("write prefix = ")[1]
    assert written.isprintable(), written
    assert tomllib.loads(f"prefix = {written}")["prefix"] == meant
