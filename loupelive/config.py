"""Validated relay configuration."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = [
    "DEFAULT_AGENT_PORT",
    "DEFAULT_VIEWER_PORT",
    "ConfigError",
    "RelayConfig",
    "describe_config",
    "load_config",
]

#: Loupe's own defaults: agents on 29971, viewers ("desktops") on 29970.
DEFAULT_AGENT_PORT: Final = 29971
DEFAULT_VIEWER_PORT: Final = 29970


def _port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be 0..65535 (0: any free port), not {value}")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value}")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_relay_name(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or len(value) > 64 or not all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
        raise ValueError(f"{attribute.name} must be 1-64 ASCII letters, digits, '-' or '_', not {value!r}")


def _share(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], not {value}")


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Everything a relay can be told.  Validated when built (``ValueError``).

    Durations are in seconds, sizes in bytes.
    """

    #: Address to listen on.  Loopback by default, like Redis' protected mode:
    #: exposing a relay is a decision (``--host 0.0.0.0``), ideally with TLS and
    #: tokens.
    host: str = "127.0.0.1"
    agent_port: int = attrs.field(default=DEFAULT_AGENT_PORT, validator=_port)
    viewer_port: int = attrs.field(default=DEFAULT_VIEWER_PORT, validator=_port)
    #: Shared secrets.  ``None``: no token required for that role.
    agent_token: str | None = attrs.field(default=None, repr=False)
    viewer_token: str | None = attrs.field(default=None, repr=False)
    #: Files holding the tokens (re-read on reload, e.g. SIGHUP); used when the
    #: token itself is not given.
    agent_token_file: str | None = None
    viewer_token_file: str | None = None
    #: TLS on both ports when both are set (PEM files; chain allowed).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Mutual TLS: require client certificates signed by this CA (PEM) …
    tls_client_ca: str | None = None
    #: … on these ports: ``both``, ``agent`` or ``viewer``.
    tls_client_ca_ports: str = attrs.field(
        default="both", validator=attrs.validators.in_(("both", "agent", "viewer"))
    )
    #: Listening on a non-loopback address without TLS and tokens for both roles
    #: is refused unless this is set: the relay would hand anyone on the
    #: network everyone's logs.
    insecure: bool = False
    #: Heartbeats are sent after this much quiet on any connection …
    #: (15 s: an idle session costs about 1 byte/s of heartbeats, both ways.)
    heartbeat_interval: float = attrs.field(default=15.0, validator=_positive)
    #: … and a peer silent this long is dropped (three missed heartbeats).
    heartbeat_timeout: float = attrs.field(default=45.0, validator=_positive)
    #: A write that makes no progress for this long means the peer stopped
    #: reading: its connection is closed (viewers: ``slow_consumer``).
    send_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Preamble + HELLO (and the TLS handshake) must complete within this.
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: After the last viewer of a session leaves, keep the stream this long
    #: (someone flipping between sessions should not restart it each time).
    stream_grace: float = attrs.field(default=5.0, validator=_non_negative)
    #: A session whose agent's connection is lost (no GOODBYE) is shown as
    #: ``disconnected`` this long before it ends, so a network blip or a relay
    #: restart does not end it: its agent reconnects and viewers resume.
    agent_grace: float = attrs.field(default=30.0, validator=_non_negative)
    #: On shutdown (SIGTERM), give viewers this long to receive what is queued
    #: for them after everyone was told the relay is going away.
    shutdown_grace: float = attrs.field(default=5.0, validator=_non_negative)
    #: After an agent's GOODBYE, wait this long for its data to drain to viewers.
    end_flush_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Per-viewer queue budget.  Over it, the viewer skips ahead to the next sync
    #: point and is told the exact range it lost (``viewer_slow``).  8 MiB is
    #: minutes of compressed logs at typical rates.
    viewer_queue_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    #: A viewer that stays behind this long is disconnected (``slow_consumer``).
    slow_viewer_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: … as is a viewer that has lost more than this share of the records
    #: offered to it (once at least ``slow_viewer_min_records`` were offered).
    slow_viewer_max_loss: float = attrs.field(default=0.5, validator=_share)
    slow_viewer_min_records: int = attrs.field(default=10_000, validator=_positive)
    #: Limits against resource exhaustion.
    max_sessions: int = attrs.field(default=100_000, validator=_positive)
    max_viewers_per_session: int = attrs.field(default=1_000, validator=_positive)
    max_viewer_connections: int = attrs.field(default=10_000, validator=_positive)
    #: Open connections in total and from one address (TLS handshakes
    #: included).  The total stays under a typical open-file limit (20,000 here).
    max_connections: int = attrs.field(default=16_000, validator=_positive)
    max_connections_per_address: int = attrs.field(default=4_000, validator=_positive)
    #: After this many failed handshakes (bad token, wrong protocol) from one
    #: address, each further rejection is delayed (doubling, up to 5 s), which
    #: slows down token guessing without holding more than a small task.
    auth_failures_before_delay: int = attrs.field(default=5, validator=_positive)
    #: Session-list updates queued for one viewer beyond its snapshot; a viewer
    #: that lets more pile up is disconnected (it reconnects to a fresh list).
    max_list_backlog: int = attrs.field(default=10_000, validator=_positive)
    #: Cluster mode: NATS server URLs, comma-separated (``nats://h:4222,…``;
    #: ``tls://`` for TLS).  None: a single relay, no NATS anywhere.
    cluster: str | None = None
    #: This relay's name in the cluster (letters, digits, ``-``, ``_``);
    #: default: the host name and the agent port.
    relay_name: str | None = attrs.field(default=None, validator=attrs.validators.optional(_check_relay_name))
    #: Subject prefix: several clusters can share one NATS system.
    cluster_prefix: str = attrs.field(default="loupelive", validator=_check_relay_name)
    #: NATS credentials file (JWT + NKey), and a CA file for ``tls://`` servers.
    cluster_creds: str | None = None
    cluster_tls_ca: str | None = None
    #: A relay not heard from for this long (seconds) is gone: its sessions
    #: turn ``disconnected`` and end after ``agent_grace`` unless their agents
    #: register elsewhere.
    cluster_timeout: float = attrs.field(default=3.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.agent_port and self.agent_port == self.viewer_port:
            raise ValueError("agent_port and viewer_port must differ")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if not self.insecure and not _is_loopback(self.host):
            missing = []
            if not self.tls:
                missing.append("TLS (tls_cert, tls_key)")
            if not (self.agent_token or self.agent_token_file):
                missing.append("an agent token")
            if not (self.viewer_token or self.viewer_token_file):
                missing.append("a viewer token")
            if missing:
                raise ValueError(
                    f"refusing to listen on {self.host} without {', '.join(missing)}: anyone who can reach "
                    "it could publish sessions and read every log. Configure them, or pass --insecure "
                    "(insecure = true) to accept the risk"
                )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


# -- loading: command line > environment > file > defaults ---------------------------

#: Fields whose values are secrets: masked when shown, and never command-line
#: flags (they would show in ``ps``).
SECRET_FIELDS: Final = frozenset({"agent_token", "viewer_token"})

#: The environment variable of a field is this prefix + the field in capitals.
ENV_PREFIX: Final = "LOUPELIVE_"

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


def config_fields() -> dict[str, attrs.Attribute[Any]]:
    """Every option of :class:`RelayConfig`, by name."""
    return {field.name: field for field in attrs.fields(RelayConfig)}


def _kind(field: attrs.Attribute[Any]) -> str:
    """``int``, ``float``, ``bool`` or ``str`` (optional or not)."""
    text = str(field.type)
    for kind in ("bool", "int", "float"):
        if text.startswith(kind):
            return kind
    return "str"


def _expected(field: attrs.Attribute[Any]) -> str:
    kind = _kind(field)
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[kind]


def convert_text(field: attrs.Attribute[Any], text: str) -> Any:
    """Parse a command-line or environment string for ``field``.

    Raises:
      ValueError: not a value of the field's type.
    """
    kind = _kind(field)
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected true or false, not {text!r}")
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def _check_file_value(field: attrs.Attribute[Any], value: Any) -> Any:
    kind = _kind(field)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ValueError(f"expected {_expected(field)}, not {type(value).__name__} {value!r}")
    return float(value) if kind == "float" else value


def load_config(
    *,
    file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RelayConfig:
    """Build a :class:`RelayConfig` from defaults < ``file`` (TOML) < environment < ``overrides``.

    ``overrides`` are the options given on the command line (already typed).

    Raises:
      ConfigError: one clear message naming the file or variable, the key and
        what is expected (with a suggestion for a misspelt key).
    """
    fields = config_fields()
    values: dict[str, Any] = {}
    if file is not None:
        try:
            with open(file, "rb") as stream:
                data = tomllib.load(stream)
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read the configuration file: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
        for key, value in data.items():
            field = fields.get(key)
            if field is None:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{file}: unknown key {key!r}{hint}")
            try:
                values[key] = _check_file_value(field, value)
            except ValueError as exc:
                raise ConfigError(f"{file}: key {key!r}: {exc}") from exc
    environ = os.environ if environ is None else environ
    for name, field in fields.items():
        variable = ENV_PREFIX + name.upper()
        if variable in environ and environ[variable] != "":
            try:
                values[name] = convert_text(field, environ[variable])
            except ValueError as exc:
                raise ConfigError(
                    f"environment variable {variable}: expected {_expected(field)}: {exc}"
                ) from exc
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    try:
        return RelayConfig(**values)
    except (ValueError, TypeError) as exc:
        origin = f"{file}: " if file else ""
        raise ConfigError(f"{origin}{exc}") from exc


def describe_config(config: RelayConfig) -> str:
    """The effective configuration as TOML, secrets masked."""
    lines = []
    for name in config_fields():
        value = getattr(config, name)
        if value is None:
            lines.append(f"# {name} is not set")
            continue
        if name in SECRET_FIELDS:
            lines.append(f'{name} = "********"')
        elif isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{name} = {value}")
        else:
            lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines)
