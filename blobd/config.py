"""Configuration: frozen dataclasses loaded from TOML, with every default.

A missing file section means its defaults. An unknown key, or a value of the
wrong kind, stops start-up with a :class:`ConfigError` naming the key
(``storage.fsync: expected true or false``). Sizes accept integers or
strings such as ``"512MiB"``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import oldvalues, tomltext
from .auth import check_owner
from .errors import BlobdError, ConfigError
from .layout import S3_MAX_KEY_BYTES, Layout, mirror_longest_key
from .sniff import AUDIO_MIME_TYPES

_UNITS = {
    "": 1, "b": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

# Marks a field as a byte size (int or "2GiB").
SIZE = {"size": True}


# Sizes and counts end up in SQLite, whose integers are 64-bit.
INT64_MAX = 2**63 - 1


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size")
    size: int | None = None
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match[2].lower() in _UNITS:
            amount = float(match[1]) * _UNITS[match[2].lower()]
            if amount > INT64_MAX:  # infinite, too, for hundreds of digits
                raise ValueError(f"{value!r} is more than {INT64_MAX} bytes")
            size = int(amount)
    if size is None:
        raise ValueError(f"expected a size such as 1048576 or \"512MiB\", got {value!r}")
    if size > INT64_MAX:
        raise ValueError(f"{value!r} is more than {INT64_MAX} bytes")
    return size


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8420
    data_dir: str = "./blobd-data"
    workers: int = 1
    tls_cert: str = ""
    tls_key: str = ""
    shutdown_timeout_seconds: float = 30.0
    # A connection with no request in progress (idle between requests, or
    # never finishing its first request's headers) is closed after this
    # long: aiohttp's default, an hour, let idle sockets pile up to the
    # file-descriptor limit (found by review). nginx's default.
    keepalive_timeout_seconds: float = 75.0
    cors_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A browser's Origin never ends in "/", but an address copied from
        # its address bar does, and versions before the origins were checked
        # took it (and never matched it): drop that one slash, so such a
        # config starts after an upgrade, and works. The header is compared
        # as a string, so the rest is written as browsers send it too.
        object.__setattr__(self, "cors_origins",
                           [_as_browsers_send(origin) for origin in self.cors_origins])

    @property
    def url(self) -> str:
        """Where ``host`` and ``port`` listen, as a URL (``http://[::1]:8420``)."""
        scheme = "https" if self.tls_cert else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    access_log: bool = True


@dataclass(frozen=True)
class AuthConfig:
    anonymous_read: bool = False
    anonymous_metrics: bool = False


@dataclass(frozen=True)
class StorageConfig:
    fsync: bool = True
    min_free_bytes: int = field(default=256 << 20, metadata=SIZE)
    # Spare room a deletion may use when the disk is full (blobd.reserve).
    reserve_bytes: int = field(default=8 << 20, metadata=SIZE)


@dataclass(frozen=True)
class LimitsConfig:
    max_blob_size: int = field(default=2 << 30, metadata=SIZE)


@dataclass(frozen=True)
class QuotaLimits:
    max_bytes: int = field(default=50 << 30, metadata=SIZE)
    max_blobs: int = 1_000_000
    max_blob_size: int = field(default=2 << 30, metadata=SIZE)
    max_monthly_upload_bytes: int = field(default=100 << 30, metadata=SIZE)
    # Reference names: each costs an index row whatever blob it names, and
    # names of a blob the owner holds already cost nothing in the limits above.
    max_refs: int = 1_000_000


@dataclass(frozen=True)
class GcConfig:
    grace_seconds: float = 0.0
    sweep_interval_seconds: float = 60.0


@dataclass(frozen=True)
class UploadsConfig:
    session_ttl_seconds: float = 86400.0
    max_sessions_per_owner: int = 100
    idle_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class AudioConfig:
    require_audio: bool = False
    # The types require_audio lets through; each one of AUDIO_MIME_TYPES,
    # the names the probe reports. All of them by default: the gate keeps
    # out what is not audio, and AC-3 that few browsers play is as much
    # audio (a rip's soundtrack) as AIFF or W64 that none does.
    allowed_types: list[str] = field(default_factory=lambda: [
        "audio/mpeg", "audio/mp4", "audio/aac", "audio/ogg", "audio/opus",
        "audio/flac", "audio/wav", "audio/webm", "audio/matroska", "audio/aiff",
        "audio/3gpp", "audio/3gpp2", "audio/x-w64", "audio/ac3", "audio/eac3",
    ])
    probe_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class ScrubConfig:
    """The background scrub (:mod:`blobd.scrub`): its own section, not
    ``[mirror]``'s, since it finds damage with or without a mirror."""
    # Modest by default: a home server's disk must stay quiet. 0: off.
    bytes_per_second: int = field(default=16 << 20, metadata=SIZE)
    period_seconds: float = 30 * 86400.0


@dataclass(frozen=True)
class MirrorConfig:
    endpoint: str = ""
    bucket: str = ""
    prefix: str = "blobs"
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"
    keep_deleted: bool = False
    concurrency: int = 4
    multipart_threshold: int = field(default=64 << 20, metadata=SIZE)
    retry_max_seconds: float = 300.0
    backup_interval_seconds: float = 3600.0
    backups_kept: int = 48
    heal_timeout_seconds: float = 10.0
    # An unfinished multipart upload of a blob begun longer ago than this is
    # taken for one a crash left (see blobd.mirror.abandoned).
    abandoned_upload_hours: float = 24.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    quotas: dict[str, QuotaLimits] = field(
        default_factory=lambda: {"default": QuotaLimits()}
    )
    gc: GcConfig = field(default_factory=GcConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    mirror: MirrorConfig | None = None
    # Not a section: how to write now a value older versions took, which
    # is taken as they took it (blobd.oldvalues); `blobd serve` logs each.
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    def quota_for(self, owner: str) -> QuotaLimits:
        """Limits from the config alone (per-owner table, else the default)."""
        return self.quotas.get(owner, self.quotas["default"])

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


MAX_WORKERS = 64


def load_config(path: str | Path | None = None) -> Config:
    """Load a TOML file; ``None`` gives the embedded default."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        # tomllib decodes the whole file first and lets this escape: a file
        # saved as Latin-1 or UTF-16 would otherwise end in a traceback.
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 (byte {exc.start})") from None
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        if name not in hints or name == "notes":
            raise ConfigError(f"{name}: unknown section")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table")
        if name == "quotas":
            sections[name] = _load_quotas(value)
        else:
            cls = typing.get_args(hints[name])[0] if name == "mirror" else hints[name]
            sections[name] = _load_section(cls, value, name)
    config = _as_older_versions_read(Config(**sections))
    _validate(config)
    return config


def _as_older_versions_read(config: Config) -> Config:
    """``config`` with the values older versions took read as they read
    them (see :mod:`blobd.oldvalues`), and a note for each."""
    notes = list(config.notes)
    host, note = oldvalues.host(config.server.host)
    notes.append(note)
    config = config.replace(server=dataclasses.replace(config.server, host=host))
    if config.mirror is not None:
        threshold, note = oldvalues.multipart_threshold(config.mirror.multipart_threshold)
        notes += [note, oldvalues.prefix_note(config.mirror.prefix)]
        config = config.replace(mirror=dataclasses.replace(
            config.mirror, multipart_threshold=threshold))
    return config.replace(notes=tuple(n for n in dict.fromkeys(notes) if n))


def _load_quotas(raw: dict[str, Any]) -> dict[str, QuotaLimits]:
    for owner, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"quotas.{owner}: expected a table")
    default = _load_section(QuotaLimits, raw.get("default", {}), "quotas.default")
    quotas = {"default": default}
    for owner, table in raw.items():
        if owner == "default":
            continue
        try:
            check_owner(owner)
        except BlobdError as exc:
            # No token can have such an owner (every version checked them
            # with the same rule), so the table never applied to anyone.
            raise ConfigError(
                f"quotas.{owner}: not an owner name ({exc.message}), so its limits never"
                f" applied to anyone; delete the [quotas.{tomltext.key(owner)}] table, or"
                " rename it to an owner that `blobd token list` shows") from None
        values = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
        values.update(table)
        quotas[owner] = _load_section(QuotaLimits, values, f"quotas.{owner}")
    return quotas


def _load_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}: unknown key")
        try:
            values[key] = _convert(value, hints[key], fields[key].metadata)
        except ValueError as exc:
            raise ConfigError(f"{prefix}.{key}: {exc}") from None
    return cls(**values)


def _convert(value: Any, kind: Any, metadata: Any) -> Any:
    if metadata.get("size"):
        return parse_size(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    # No count, size or duration here is meaningfully negative (or infinite).
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if value < 0:
            raise ValueError("cannot be negative")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if not math.isfinite(value) or value < 0:
            raise ValueError("expected a finite number, not negative")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    if typing.get_origin(kind) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        return list(value)
    raise ValueError(f"unsupported value {value!r}")


# A check: whether it holds, the key it is about, what is wrong otherwise.
Check = tuple[bool, str, str]


def override_server(config: Config, flags: dict[str, Any]) -> Config:
    """``config`` with ``[server]`` values given on the command line
    (``--port`` and the like), checked as the file's own are: a bad one
    stops with one line naming the flag."""
    if not flags:
        return config
    config = config.replace(server=dataclasses.replace(config.server, **flags))
    config = _as_older_versions_read(config)
    _validate(config, {f"server.{key}": "--" + key.replace("_", "-") for key in flags})
    return config


def _validate(config: Config, names: dict[str, str] | None = None) -> None:
    """``names``: what to call a key in the message (a flag it came from)."""
    checks: list[Check] = [
        (0 < config.server.port < 65536, "server.port", "expected 1-65535"),
        *_host_checks(config.server.host),
        # "" would make the working directory the store.
        (config.server.data_dir != "", "server.data_dir",
         "empty; name a directory (a relative one is taken from the working directory)"
         + _literal_store_note(config.server.data_dir)),
        # No shell reads this file to expand "~": "~/blobd-data" was a new,
        # empty store in a directory named "~" under the working directory.
        (not config.server.data_dir.startswith("~"), "server.data_dir",
         f"{config.server.data_dir!r}: '~' is not expanded here; give the whole path"
         + _literal_store_note(config.server.data_dir)),
        *_origin_checks(config.server.cors_origins),
        (config.server.workers >= 1, "server.workers", "expected at least 1"),
        # Each worker is a whole server (about 45 MB); a typo of a thousand
        # or more forked until the machine stalled (found by review).
        (config.server.workers <= MAX_WORKERS, "server.workers",
         f"expected at most {MAX_WORKERS}; one or two per core is the useful range"),
        # 0 would be aiohttp's "never".
        (config.server.keepalive_timeout_seconds > 0,
         "server.keepalive_timeout_seconds", "expected a positive number"),
        (bool(config.server.tls_cert) == bool(config.server.tls_key),
         "server.tls_cert", "tls_cert and tls_key go together"),
        (config.logging.level.lower() in ("debug", "info", "warning", "error"),
         "logging.level", "expected debug, info, warning or error"),
        (config.gc.grace_seconds >= 0, "gc.grace_seconds", "cannot be negative"),
        # The sweeper waits this long between rounds: with 0, older versions
        # swept without pause, a write transaction on every turn of the
        # event loop (a core busy, writers queued behind it).
        (config.gc.sweep_interval_seconds > 0, "gc.sweep_interval_seconds",
         "expected a positive number; 0 swept without pause, holding the index's write"
         " lock over and over: write 1 to sweep every second"),
        # limits.max_blob_size = 0 and uploads.max_sessions_per_owner = 0 are
        # taken, as older versions took them: only the empty blob may be
        # uploaded, and no upload session made (blobd.sessions says so).
        (config.uploads.session_ttl_seconds > 0,
         "uploads.session_ttl_seconds", "expected a positive number"),
        (config.uploads.idle_timeout_seconds > 0,
         "uploads.idle_timeout_seconds", "expected a positive number"),
        # A pass ends every period: 0 would restart the walk without pause.
        (config.scrub.period_seconds > 0,
         "scrub.period_seconds", "expected a positive number"),
    ]
    checks += _audio_checks(config.audio)
    if config.mirror is not None:
        checks += _mirror_checks(config.mirror)
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"{(names or {}).get(key, key)}: {problem}")


def _literal_store_note(data_dir: str) -> str:
    """Where an older blobd, which took "~" as a directory's name and ""
    as the working directory, keeps the store this setting made: the whole
    path a user should give is that one, not their home's (an empty store
    there would look like every blob lost). Refused all the same: the store
    it names changed with the directory a command was run from."""
    if data_dir and not data_dir.startswith("~"):
        return ""
    literal = Path(data_dir).absolute()
    if not Layout(literal).index_path.is_file():
        return ""
    return (f" (the store an older blobd made from this setting is {literal}:"
            f" write data_dir = {tomltext.string(str(literal))})")


# A host name as resolvers take it: dot-separated labels of letters, digits,
# hyphens (and underscores, which /etc/hosts allows), a final dot optional.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
                       r"(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _host_checks(host: str) -> list[Check]:
    try:
        ipaddress.ip_address(host)
        is_address = True
    except ValueError:
        is_address = False
    return [
        # An empty host binds every interface: say so rather than get it by accident.
        (host != "", "server.host",
         "empty; to listen on every interface, say 0.0.0.0 (IPv4) or :: (IPv6)"),
        (not host.startswith("["), "server.host",
         f"{host!r}: an IPv6 address goes without brackets (::1)"),
        (host == "" or host.startswith("[") or is_address
         or (len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None), "server.host",
         f"{host!r} is neither an IP address nor a host name"),
        # The resolver reads "0" as 0.0.0.0 and "192.168.1.010" as .8 (octal):
        # all digits and dots is meant as an address, and must be a plain one.
        (is_address or not re.fullmatch(r"[0-9.]+", host), "server.host",
         f"{host!r} is not an IPv4 address (four numbers 0-255, no leading zeros)"),
    ]


# What a browser sends as Origin: scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]+")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _as_browsers_send(origin: Any) -> Any:
    """An origin as a browser serialises it in its Origin header (RFC 6454
    6.1): no trailing "/", scheme and host in lower case, no default port.
    Anything else is left as it is, for the checks to refuse."""
    if not isinstance(origin, str) or "://" not in origin:
        return origin
    try:
        parts = urllib.parse.urlsplit(origin)
        port = parts.port
    except ValueError:
        return origin
    if parts.path not in ("", "/") or parts.query or parts.fragment or \
            origin.endswith(("?", "#")) or not parts.hostname or \
            _ORIGIN.fullmatch(origin.removesuffix("/")) is None:
        return origin
    scheme, host = parts.scheme.lower(), parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return f"{scheme}://{host}"


def _origin_checks(origins: list[str]) -> list[Check]:
    def is_origin(text: str) -> bool:
        if text == "*":
            return True
        try:
            parts = urllib.parse.urlsplit(text)
            parts.port  # raises on a port that is not one
        except ValueError:
            return False
        return _ORIGIN.fullmatch(text) is not None and bool(parts.hostname)

    bad = [origin for origin in origins if not is_origin(origin)]
    # An entry that is no origin never equals a browser's Origin header.
    return [(not bad, "server.cors_origins",
             f"{bad[0]!r} is not an origin; expected scheme://host[:port] with no path,"
             " e.g. \"http://nas.local:3000\", or \"*\"" if bad else "")]


_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")


def _mirror_checks(mirror: MirrorConfig) -> list[Check]:
    endpoint = urllib.parse.urlsplit(mirror.endpoint)
    return [
        (bool(mirror.endpoint), "mirror.endpoint", "required when [mirror] is present"),
        (bool(mirror.bucket), "mirror.bucket", "required when [mirror] is present"),
        # What the S3 client takes (it checks before any request, in a
        # message of many lines); "s3://blobd" or "blobd/blobs" fail here.
        # It also takes access point ARNs, whose grammar it keeps to itself.
        (not mirror.bucket or mirror.bucket.startswith("arn:")
         or _BUCKET.fullmatch(mirror.bucket) is not None, "mirror.bucket",
         f"{mirror.bucket!r} is not a bucket name: letters, digits, '.', '-' and '_' only"
         " (a folder in the bucket goes in mirror.prefix)"),
        (not mirror.endpoint or (endpoint.scheme in ("http", "https")
                                 and bool(endpoint.hostname)),
         "mirror.endpoint", "expected an http:// or https:// URL with a host"),
        *_prefix_checks(mirror.prefix),
        # Only whether a blob goes up in parts: the parts themselves are
        # 16 MiB or more whatever this is, and a single part may be any size
        # (it is the last), so "1MiB" always worked and stays accepted after
        # an upgrade. 0 would send an empty blob as a multipart upload of no parts.
        (mirror.multipart_threshold >= 1,
         "mirror.multipart_threshold", "expected at least 1 byte"),
        # S3 takes no single PUT above 5 GiB: a blob between the two would
        # be refused, and retried, for ever (found by review).
        (mirror.multipart_threshold <= 5 << 30,
         "mirror.multipart_threshold", "expected at most 5GiB (S3's largest single upload)"),
        (mirror.concurrency >= 1, "mirror.concurrency", "expected at least 1"),
        (mirror.retry_max_seconds > 0, "mirror.retry_max_seconds", "expected a positive number"),
        (mirror.backup_interval_seconds >= 0,
         "mirror.backup_interval_seconds", "cannot be negative"),
        (mirror.backups_kept >= 1, "mirror.backups_kept", "expected at least 1"),
        (mirror.heal_timeout_seconds > 0,
         "mirror.heal_timeout_seconds", "expected a positive number"),
        (mirror.abandoned_upload_hours > 0,
         "mirror.abandoned_upload_hours", "expected a positive number"),
    ]


def _prefix_checks(prefix: str) -> list[Check]:
    """The keys are <prefix>/ab/cd/<hash>, made by blobd.layout.mirror_key
    as they always were: slashes at either end dropped ("/blobd/" is
    "blobd"), the rest sent as written. A "." or ".." segment never worked
    on SeaweedFS, which refuses such keys (400 to PUT, GET and HEAD), and
    other stores resolve it, so the same config would name other objects
    there: refused. NUL no store takes. An empty segment ("a//b") and the
    other control characters were written and read back: taken, with a
    note (blobd.oldvalues), so the objects mirrored under them stay found."""
    inner = prefix.strip("/")
    dots = [s for s in inner.split("/") if s in (".", "..")]
    problem = (f"has a {dots[0]!r} segment, which SeaweedFS refuses in a key and other"
               " stores resolve" if dots
               else "has a NUL character, which no store takes in a key"
               if "\0" in prefix else "")
    fix = _prefix_to_write(prefix)
    return [(not problem, "mirror.prefix",
             f"{prefix!r} {problem}; write prefix = {tomltext.string(fix)}"),
            *_prefix_length_checks(prefix)]


def _prefix_to_write(prefix: str) -> str:
    """The prefix a refused one stands for, which the checks take: NUL
    dropped, "." and ".." resolved as a store that resolves them does
    (a ".." at the top stays at the top, as in a URL), so that writing
    the message's value never meets a refusal of its own."""
    text = prefix.replace("\0", "")
    segments = text.strip("/").split("/")
    if not any(s in (".", "..") for s in segments):
        return text
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            kept = kept[:-1]
        elif segment not in (".", ""):
            kept.append(segment)
    return "/".join(kept)


def _prefix_length_checks(prefix: str) -> list[Check]:
    """S3 refuses a key over its limit, so a prefix that makes the
    mirror's longest key too long would fail every such upload."""
    inner = prefix.strip("/").encode()
    what, key = mirror_longest_key(prefix)
    size = len(key.encode())
    most = S3_MAX_KEY_BYTES - (size - len(inner))
    return [(size <= S3_MAX_KEY_BYTES, "mirror.prefix",
             f"{prefix!r} is {len(inner)} bytes (UTF-8), which makes the keys of the"
             f" {what} {size} bytes, over S3's limit of {S3_MAX_KEY_BYTES} bytes per"
             f" object key; expected at most {most} bytes")]


def _audio_checks(audio: AudioConfig) -> list[Check]:
    unknown = [t for t in audio.allowed_types if t not in AUDIO_MIME_TYPES]
    known = ", ".join(sorted(AUDIO_MIME_TYPES))
    return [
        (not unknown, "audio.allowed_types",
         f"{', '.join(unknown)} not recognised; expected some of {known}"),
        (bool(audio.allowed_types) or not audio.require_audio, "audio.allowed_types",
         "empty, so require_audio would refuse every upload"),
        (audio.probe_timeout_seconds > 0,
         "audio.probe_timeout_seconds", "expected a positive number"),
    ]
