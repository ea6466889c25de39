"""The command line: ``loupelive serve | sessions | tail | pipe``.

Errors a user can cause (bad arguments, an unreachable relay, an unknown
session, a refused token) print one line on stderr and exit non-zero; no
traceback.  Exit codes: 0 success, 1 runtime failure, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

import trio

from . import __version__
from ._util import leaf_exception
from .agent import open_agent
from .config import (
    DEFAULT_AGENT_PORT,
    DEFAULT_VIEWER_PORT,
    SECRET_FIELDS,
    ConfigError,
    RelayConfig,
    config_fields,
    convert_text,
    describe_config,
    load_config,
)
from .errors import ConnectionClosed, HandshakeRejected, LoupeError, RemoteProtocolError
from .records import Level
from .relay import serve_relay
from .term import (
    TailOptions,
    TailPrinter,
    app_matcher,
    follow_sessions,
    session_table,
    use_colour,
    watch_sessions,
)
from .viewer import open_viewer

__all__ = ["main"]

log = logging.getLogger("loupelive")

#: Longest stdin line ``pipe`` turns into one record; longer lines are split.
MAX_PIPE_LINE = 1024 * 1024


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj)


class UsageError(Exception):
    """Bad arguments found after parsing (exit code 2)."""


class CommandError(Exception):
    """A command failed in a way the user can act on (exit code 1)."""


def parse_address(text: str | None, default_port: int, *, allow_zero: bool = False) -> tuple[str, int]:
    """Parse ``HOST``, ``HOST:PORT``, ``:PORT`` or ``[V6]:PORT``.

    Raises:
      UsageError: not an address.
    """
    if not text:
        return "127.0.0.1", default_port
    host, port = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"bad relay address {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"bad relay address {text!r}")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    host = host or "127.0.0.1"
    if not port:
        return host, default_port
    if not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise UsageError(f"bad port in relay address {text!r}")
    return host, int(port)


def _read_secret(path: str | None, env: str) -> str | None:
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                return file.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return os.environ.get(env) or None


def _client_tls(args: argparse.Namespace) -> bool | ssl.SSLContext:
    """``--tls``/``--ca``/``--client-cert``: what to pass as ``tls=``."""
    if not (args.tls or args.ca or args.client_cert):
        return False
    try:
        context = ssl.create_default_context(cafile=args.ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if args.client_cert:
            context.load_cert_chain(args.client_cert, args.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from exc
    return context


def _client_token(args: argparse.Namespace, env: str) -> str | None:
    """The token from ``--token-file``, else the role's environment variable."""
    return _read_secret(args.token_file, env)


# -- serve -------------------------------------------------------------------------


def _write_ready_file(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(data, file)
        file.write("\n")
    os.replace(tmp, path)


async def _serve(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in config_fields() if name not in SECRET_FIELDS}
    try:
        config = load_config(file=args.config, overrides=overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    if args.check_config:
        sys.stdout.write(describe_config(config) + "\n")
        return 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            try:
                relay = await nursery.start(serve_relay, config)
            except ssl.SSLError as exc:
                raise CommandError(f"cannot load the TLS certificate or key: {exc}") from exc
            except OSError as exc:
                if exc.filename:  # a certificate or key file
                    raise CommandError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc
                raise CommandError(
                    f"cannot listen on {config.host} (agent port {config.agent_port}, "
                    f"viewer port {config.viewer_port}): {exc.strerror or exc}"
                ) from exc
            ready: dict[str, Any] = {
                "agent_port": relay.agent_port,
                "viewer_port": relay.viewer_port,
                "pid": os.getpid(),
            }
            if args.metrics:
                try:
                    from .metrics import serve_metrics
                except ImportError as exc:
                    raise CommandError(str(exc)) from exc

                metrics_host, metrics_port = parse_address(args.metrics, 9464, allow_zero=True)
                try:
                    ready["metrics_port"] = await nursery.start(
                        functools.partial(serve_metrics, per_session=bool(args.metrics_per_session)),
                        relay,
                        metrics_host,
                        metrics_port,
                    )
                except OSError as exc:
                    raise CommandError(
                        f"cannot serve metrics on {args.metrics}: {exc.strerror or exc}"
                    ) from exc
            if args.web:
                ready["web_port"] = await _start_web(nursery, relay, config, args.web)
            if args.ready_file:
                _write_ready_file(args.ready_file, ready)
            if args.demo:
                nursery.start_soon(_run_demo_agent, config, relay.agent_port, relay._agent_token)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        relay.reload()
                    except (OSError, ssl.SSLError) as exc:
                        log.error("reload failed, keeping the previous settings: %s", exc)
                    else:
                        log.info("reloaded the TLS certificate and the token files")
                    continue
                log.info("received %s, shutting down", signal.Signals(signum).name)
                # A second signal during the grace period stops at once.
                with trio.move_on_after(config.shutdown_grace + 1.0) as grace_scope:
                    async with trio.open_nursery() as waiter:

                        async def second_signal() -> None:
                            async for _ in signals:
                                grace_scope.cancel()
                                return

                        waiter.start_soon(second_signal)
                        await relay.shutdown(config.shutdown_grace)
                        waiter.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
                break
    return 0


#: The web viewer's port when ``--web`` names only a host.
DEFAULT_WEB_PORT = 29980


async def _start_web(nursery: trio.Nursery, relay: Any, config: RelayConfig, address: str) -> int:
    """Start the web viewer; return its bound port."""
    try:
        from .web import serve_web
    except ImportError as exc:
        raise CommandError(f"--web needs the web extra (pip install 'loupelive[web]'): {exc}") from exc
    from .config import _is_loopback

    web_host, web_port = parse_address(address, DEFAULT_WEB_PORT, allow_zero=True)
    if not config.insecure and not _is_loopback(web_host):
        if not config.tls_cert or not (config.viewer_token or config.viewer_token_file):
            raise CommandError(
                f"refusing to serve the web viewer on {web_host} without TLS and a viewer token: anyone "
                "who can connect would read every log. Configure them, or pass --insecure to accept the risk"
            )
    try:
        port: int = await nursery.start(serve_web, relay, web_host, web_port)
    except OSError as exc:
        raise CommandError(f"cannot serve the web viewer on {address}: {exc.strerror or exc}") from exc
    return port


async def _run_demo_agent(config: RelayConfig, port: int, token: str | None) -> None:
    from .demo import run_demo

    tls: bool | ssl.SSLContext = False
    if config.tls_cert:
        # In-process: trust our own certificate, whatever name it carries.
        context = ssl.create_default_context(cafile=config.tls_cert)
        context.check_hostname = False
        tls = context
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    try:
        async with open_agent(
            host,
            port,
            app="demo-shop",
            app_version=__version__,
            tags={"demo": "true"},
            token=token,
            tls=tls,
        ) as agent:
            log.info("demo agent running: session %s (app demo-shop)", agent.session_id)
            await run_demo(agent)
    except (OSError, LoupeError) as exc:
        log.error("demo agent failed: %s", exc)


# -- sessions ------------------------------------------------------------------------


def _print(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


async def _sessions(args: argparse.Namespace) -> int:
    host, port = parse_address(args.relay, DEFAULT_VIEWER_PORT)
    token = _client_token(args, "LOUPELIVE_VIEWER_TOKEN")
    out = sys.stdout
    terminal = out.isatty()
    colour = use_colour(out)
    async with open_viewer(host, port, token=token, tls=_client_tls(args), ca_file=args.ca) as viewer:
        if args.watch and terminal and args.format == "text":
            await watch_sessions(viewer, out, fmt="text", terminal=True, colour=colour)
            return 0
        sessions = viewer.sessions()
        if args.format == "json":
            _print(out, json.dumps([s.to_json() for s in sessions]))
        elif sessions:
            _print(out, session_table(sessions, colour=colour))
        else:
            _print(out, "no live sessions")
        if args.watch:
            await watch_sessions(viewer, out, fmt=args.format, terminal=False, colour=colour)
    return 0


# -- stats -----------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_stats(stats: dict[str, Any]) -> str:
    """A readable summary of a relay's statistics."""
    ratio = stats["raw_bytes_in"] / stats["bytes_in"] if stats["bytes_in"] else 0.0
    lines = [
        f"uptime              {stats['uptime']:.0f} s",
        f"sessions            {stats['sessions']} ({stats['streaming_sessions']} streaming, "
        f"{stats['disconnected_sessions']} disconnected)",
        f"connections         {stats['connections']} (agents {stats['agent_connections']}, agent data "
        f"{stats['agent_data_connections']}, viewers {stats['viewer_connections']}, viewer streams "
        f"{stats['viewer_streams']})",
        f"records in          {stats['records_in']} in {stats['batches_in']} batches",
        f"bytes in / out      {_human_bytes(stats['bytes_in'])} / {_human_bytes(stats['bytes_out'])}"
        f" (compression {ratio:.1f}x)",
        f"dropped             {stats['records_dropped']} records in {stats['batches_dropped']} batches",
        "gaps                "
        + (", ".join(f"{k} {v}" for k, v in sorted(stats["gaps_by_reason"].items())) or "none"),
        f"slow consumers      {stats['slow_consumer_disconnects']} disconnected",
        f"queued              {_human_bytes(stats['queued_bytes'])}",
        "rejected            "
        + (", ".join(f"{k} {v}" for k, v in sorted(stats["rejected"].items())) or "none"),
        f"memory (RSS)        {_human_bytes(stats['rss_bytes'])}",
    ]
    cluster = stats.get("cluster") or {}
    if cluster:
        lines += [
            f"cluster             relay {cluster['name']}, NATS {'connected' if cluster['connected'] else 'DOWN'}"
            f" ({cluster['nats_reconnects']} reconnects), peers {', '.join(cluster['peers']) or 'none'}",
            f"  remote sessions   {cluster['remote_sessions']}; feeds out {cluster['feeds']}",
            f"  feed bytes        out {_human_bytes(cluster['feed_bytes_out'])}, in {_human_bytes(cluster['feed_bytes_in'])}",
            f"  losses            {cluster['cluster_overflow_gaps']} cluster_overflow gaps, "
            f"{cluster['feed_holes']} feed holes, {cluster['nats_inbox_drops']} inbox drops",
        ]
    for detail in stats.get("session_details", []):
        lines.append(
            f"  {detail['session_id']}  {detail['app']:<16} in {detail['records_in']} records "
            f"{_human_bytes(detail['bytes_in'])}, out {_human_bytes(detail['bytes_out'])}, "
            f"viewers {len(detail['viewers'])}, dropped {detail['records_dropped']}"
        )
    return "\n".join(lines)


async def _stats(args: argparse.Namespace) -> int:
    host, port = parse_address(args.relay, DEFAULT_VIEWER_PORT)
    token = _client_token(args, "LOUPELIVE_VIEWER_TOKEN")
    async with open_viewer(host, port, token=token, tls=_client_tls(args), ca_file=args.ca) as viewer:
        stats = await viewer.statistics(detail=args.detail)
    if args.format == "json":
        _print(sys.stdout, json.dumps(stats))
    else:
        _print(sys.stdout, format_stats(stats))
    return 0


# -- tail ------------------------------------------------------------------------------


async def _tail(args: argparse.Namespace) -> int:
    host, port = parse_address(args.relay, DEFAULT_VIEWER_PORT)
    token = _client_token(args, "LOUPELIVE_VIEWER_TOKEN")
    chosen = sum((args.session is not None, args.app is not None, bool(args.all)))
    if chosen != 1:
        raise UsageError("name exactly one of: a SESSION, --app GLOB, --all")
    if args.since is not None and args.session is None:
        raise UsageError("--since needs one SESSION (seqs are per session)")
    try:
        level = Level.parse(args.level) if args.level else Level.DEBUG
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        grep = re.compile(args.grep, re.IGNORECASE) if args.grep is not None else None
    except re.error as exc:
        raise UsageError(f"--grep: not a valid regular expression: {exc}") from exc
    out = sys.stdout
    options = TailOptions(
        format=args.format,
        colour=args.format == "text" and use_colour(out),
        grep=grep,
        corrected_time=args.corrected_time,
        labels=args.session is None,
    )
    async with open_viewer(host, port, token=token, tls=_client_tls(args), ca_file=args.ca) as viewer:
        printer = TailPrinter(out, options, viewer)
        if args.session is not None:
            info = (
                await viewer.wait_for_session(args.session)
                if args.wait
                else viewer.find_session(args.session)
            )
            if args.format == "text":
                log.info("watching session %s (%s on %s)", info.session_id, info.app, info.host)
            await follow_sessions(
                viewer,
                printer,
                select=app_matcher(None),
                history=args.history,
                min_level=level,
                after_seq=args.since,
                only=info.session_id,
            )
        else:
            if args.format == "text":
                log.info("following %s", "every session" if args.all else f"sessions of apps {args.app!r}")
            await follow_sessions(
                viewer, printer, select=app_matcher(args.app), history=args.history, min_level=level
            )
    return 0


# -- pipe ------------------------------------------------------------------------------


def _json_line_to_kwargs(line: str) -> dict[str, Any]:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    level = obj.get("level", "INFO")
    kwargs: dict[str, Any] = {
        "level": Level.parse(level if isinstance(level, (str, int)) else "INFO"),
        "message": str(obj.get("message", "")),
        "logger": str(obj.get("logger", "") or ""),
        "thread": str(obj.get("thread", "") or ""),
        "exception": None if obj.get("exception") is None else str(obj["exception"]),
        "fields": obj.get("fields") if isinstance(obj.get("fields"), dict) else None,
    }
    ts = obj.get("timestamp")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        kwargs["timestamp"] = float(ts)
    return kwargs


async def _pipe(args: argparse.Namespace) -> int:
    # Several relays (a cluster): "a:29971,b:29971", used in turn when one fails.
    addresses = [parse_address(part.strip(), DEFAULT_AGENT_PORT) for part in (args.relay or "").split(",")]
    (host, port), fallbacks = addresses[0], addresses[1:]
    token = _client_token(args, "LOUPELIVE_AGENT_TOKEN")
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    bad_lines = 0
    async with (
        stdin,
        open_agent(
            host,
            port,
            app=args.app,
            app_version=args.app_version,
            token=token,
            tls=_client_tls(args),
            ca_file=args.ca,
            fallbacks=fallbacks,
        ) as agent,
    ):
        log.info("session %s: publishing stdin as app %s", agent.session_id, args.app)
        pending = b""
        while True:
            chunk = await stdin.receive_some(65536)
            data = pending + chunk
            lines = data.split(b"\n")
            pending = lines.pop() if chunk else b""
            while len(pending) > MAX_PIPE_LINE:
                lines.append(pending[:MAX_PIPE_LINE])
                pending = pending[MAX_PIPE_LINE:]
            for raw in lines:
                text = raw.decode("utf-8", "replace").rstrip("\r")
                if not chunk and not text:
                    continue
                if args.format == "json":
                    try:
                        agent.log(**_json_line_to_kwargs(text))
                        continue
                    except ValueError as exc:
                        bad_lines += 1
                        if bad_lines == 1:
                            log.warning("line is not a JSON record (%s); sending it as text", exc)
                agent.log(Level.INFO, text, logger="stdin", thread="")
            if not chunk:
                break
            # Let the streamer run between reads of a fast producer.
            await trio.lowlevel.checkpoint()
    return 0


# -- entry point --------------------------------------------------------------------------


def _client_options(parser: argparse.ArgumentParser, default_port: int, token_env: str) -> None:
    parser.add_argument(
        "--relay", metavar="HOST[:PORT]", help=f"relay address (default 127.0.0.1:{default_port})"
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help=f"read the access token from FILE (default: ${token_env})"
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system trust store)")
    parser.add_argument("--ca", metavar="FILE", help="trust this CA bundle for TLS (implies --tls)")
    parser.add_argument(
        "--client-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS (implies --tls)"
    )
    parser.add_argument("--client-key", metavar="FILE", help="private key for --client-cert")


#: Help for the relay options that get a command-line flag (all but secrets).
_OPTION_HELP: dict[str, str] = {
    "host": "address to listen on (default 127.0.0.1)",
    "agent_port": "port for agents (default 29971; 0: any free port)",
    "viewer_port": "port for viewers (default 29970; 0: any free port)",
    "agent_token_file": "require the agent token in this file (default: $LOUPELIVE_AGENT_TOKEN)",
    "viewer_token_file": "require the viewer token in this file (default: $LOUPELIVE_VIEWER_TOKEN)",
    "tls_cert": "PEM certificate (chain allowed): TLS on both ports",
    "tls_key": "PEM private key for --tls-cert",
    "tls_client_ca": "require client certificates signed by this CA (mutual TLS)",
    "tls_client_ca_ports": "which ports require client certificates: both, agent or viewer (default both)",
    "insecure": "allow a non-loopback --host without TLS and tokens (everyone who can connect sees every log)",
    "agent_grace": "keep a session whose agent vanished this long, as 'disconnected' (seconds, default 30)",
}


def _config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per RelayConfig option (secrets excepted), default: not given."""
    for name, field in config_fields().items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = _OPTION_HELP.get(name, f"see README (default {field.default})")
        if str(field.type) == "bool":
            parser.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
            continue
        parser.add_argument(
            flag,
            type=functools.partial(_parse_option, name),
            default=None,
            metavar=name.upper(),
            help=help_text,
        )


def _parse_option(name: str, text: str) -> Any:
    try:
        return convert_text(config_fields()[name], text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loupelive", description="Watch application logs live through a relay."
    )
    parser.add_argument("--version", action="version", version=f"loupelive {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level on stderr (default INFO)")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines on stderr as text or as JSON objects, one per line (default text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Every option can also come from --config FILE (TOML, keys named like "
        "the options with underscores) or the environment (LOUPELIVE_ + the key in capitals); "
        "precedence: command line > environment > file > defaults.",
    )
    serve.add_argument("--config", metavar="FILE", help="read options from this TOML file")
    serve.add_argument(
        "--check-config", action="store_true", help="print the effective configuration and exit"
    )
    serve.add_argument(
        "--ready-file",
        metavar="PATH",
        help="write {agent_port, viewer_port, pid} as JSON here once listening",
    )
    serve.add_argument(
        "--demo", action="store_true", help="also run a demo agent that logs realistic records"
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics and /healthz over HTTP here (needs loupelive[metrics])",
    )
    serve.add_argument(
        "--metrics-per-session", action="store_true", help="also export per-session series (opt-in)"
    )
    serve.add_argument(
        "--web",
        metavar="HOST:PORT",
        help=f"serve the web viewer (page + WebSocket) here; port {DEFAULT_WEB_PORT} if omitted; "
        "TLS when the relay has TLS; needs loupelive[web]",
    )
    _config_options(serve)

    sessions = sub.add_parser("sessions", help="list live sessions")
    _client_options(sessions, DEFAULT_VIEWER_PORT, "LOUPELIVE_VIEWER_TOKEN")
    sessions.add_argument("--format", choices=["text", "json"], default="text")
    sessions.add_argument(
        "--watch",
        action="store_true",
        help="keep the list live: redrawn in place on a terminal, one line per change otherwise",
    )

    stats = sub.add_parser("stats", help="show a running relay's statistics")
    _client_options(stats, DEFAULT_VIEWER_PORT, "LOUPELIVE_VIEWER_TOKEN")
    stats.add_argument("--format", choices=["text", "json"], default="text")
    stats.add_argument("--detail", action="store_true", help="per session too")

    tail = sub.add_parser("tail", help="print the records of one or several sessions as they arrive")
    tail.add_argument(
        "session", metavar="SESSION", nargs="?", help="session id, unambiguous id prefix, or app name"
    )
    tail.add_argument("--app", metavar="GLOB", help="follow every session whose app matches (now and later)")
    tail.add_argument("--all", action="store_true", help="follow every session (now and later)")
    _client_options(tail, DEFAULT_VIEWER_PORT, "LOUPELIVE_VIEWER_TOKEN")
    tail.add_argument("--wait", action="store_true", help="wait for the session to appear")
    tail.add_argument("--history", type=int, default=0, metavar="N", help="start with up to N recent records")
    tail.add_argument(
        "--level",
        metavar="LEVEL",
        help="minimum level (pushed to the agent): debug, info, warning, error, critical",
    )
    tail.add_argument("--grep", metavar="REGEX", help="only records matching (case-insensitive; client side)")
    tail.add_argument(
        "--since", type=int, metavar="SEQ", help="resume: every record after SEQ still held by the agent"
    )
    tail.add_argument(
        "--corrected-time",
        action="store_true",
        help="show record times corrected by the relay's estimate of the agent's clock offset",
    )
    tail.add_argument("--format", choices=["text", "json"], default="text")

    pipe = sub.add_parser("pipe", help="publish stdin lines as a session")
    pipe.add_argument("--app", required=True, help="application name to register")
    pipe.add_argument("--app-version", default="", help="application version to register")
    _client_options(pipe, DEFAULT_AGENT_PORT, "LOUPELIVE_AGENT_TOKEN")
    pipe.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text: one INFO record per line; json: one JSON record object per line",
    )
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "serve": _serve,
    "sessions": _sessions,
    "stats": _stats,
    "tail": _tail,
    "pipe": _pipe,
}


def _fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"loupelive: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (the ``loupelive`` console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = Level.parse(args.log_level).value
    except ValueError as exc:
        parser.error(str(exc))
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    elif args.command == "serve":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("loupelive: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if getattr(args, "history", 0) < 0:
        parser.error("--history must not be negative")
    try:
        try:
            code = trio.run(_COMMANDS[args.command], args)
        except BaseExceptionGroup as group:
            raise leaf_exception(group) from None
    except UsageError as exc:
        _fail(str(exc), 2)
    except CommandError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # The reader went away (``tail | head``): not an error.  Point stdout
        # at /dev/null so the interpreter's final flush does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        code = 0
    except HandshakeRejected as exc:
        _fail(f"the relay refused: {exc.reason} ({exc.code.value})")
    except ConnectionClosed as exc:
        _fail(f"connection to the relay closed: {exc.reason} ({exc.code.value})")
    except RemoteProtocolError as exc:
        _fail(f"protocol error: {exc} ({exc.code.value})")
    except LoupeError as exc:
        _fail(str(exc))
    except OSError as exc:
        target = getattr(args, "relay", None) or "the relay"
        _fail(f"cannot reach {target}: {exc.strerror or exc}")
    raise SystemExit(code)
