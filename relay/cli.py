"""The `relay` command: serve, listen, publish, token, demo.

User mistakes end in one line on stderr and exit status 2; nothing a user
can cause prints a traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import urllib.parse
from typing import Any, BinaryIO, Callable

from relay import __version__
from relay.wire.addr import parse_hostport
from relay.wire.config import ConfigError, load


# `relay --log-format json serve`: its own lines (the start-up line, an
# error) in the log's format, so that every line a node prints parses alike
_json_lines = False


def _say(msg: str, level: int = logging.INFO, file: Any = None, **fields: Any) -> None:
    """One line: plain text, or with --log-format json a JSON object as the
    log's (`fields` go into the object)."""
    if _json_lines:
        from relay.ops.events import JsonFormatter
        record = logging.makeLogRecord({"name": "relay", "levelno": level, "levelname": logging.getLevelName(level),
                                         "msg": msg, "fields": fields})
        msg = JsonFormatter().format(record)
    print(msg, file=file or sys.stdout, flush=True)


def _die(msg: str, code: int = 2) -> None:
    if _json_lines:
        _say(msg, logging.ERROR, sys.stderr)
    else:
        print(f"relay: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number above zero."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def _run(coro) -> Any:
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)


# ------------------------------------------------------------------- serve

def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.listen:
        out["listen"] = args.listen
    if args.admin is not None:
        out["admin"] = args.admin
    if args.open:
        out["auth"] = "open"
    if args.max_listeners is not None:
        out["max_listeners"] = args.max_listeners
    if args.redirect is not None:
        out["redirect"] = args.redirect
    if args.quic is not None:
        out["quic"] = args.quic
    if args.hls is not None:
        out["hls"] = args.hls
    if args.public is not None:
        out["public"] = args.public
    if args.workers is not None:
        out["workers"] = args.workers if args.workers == "auto" else _workers(args.workers)
    if args.room:
        rooms = []
        for spec in args.room:
            name, sep, ingest = spec.partition("=")
            if not sep:
                _die(f"--room {spec!r}: expected NAME=HOST:PORT")
            rooms.append({"name": name, "ingest": ingest, "sources": args.source or ["127.0.0.1"]})
        out["room"] = rooms
    return out


def _workers(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        _die(f"--workers {text!r}: expected a number or 'auto'")
        raise


def cmd_serve(args: argparse.Namespace) -> None:
    from relay.listeners.quic.tls import CertificateError
    from relay.node import Node

    global _json_lines
    _json_lines = args.log_format == "json"

    try:
        cfg = load(path=args.config, overrides=_serve_overrides(args))
    except ConfigError as e:
        _die(str(e))
    if cfg.auth == "open":
        logging.getLogger("relay").warning("auth is open: anyone who can reach the node may listen")

    async def main() -> None:
        try:
            node = Node(cfg)
        except CertificateError as e:
            _die(f"[node] quic_cert: {e}")
        except MemoryError:
            _die(f"[node] max_listeners = {cfg.max_listeners}: not enough memory for the listener arena; "
                 "lower max_listeners or ring_bytes")
        try:
            await node.start()
        except OSError as e:
            _die(f"cannot bind: {e.strerror or e}", 1)
        listen = f"{cfg.listen[0]}:{cfg.listen[1]}"
        admin = f"http://{cfg.admin[0]}:{cfg.admin[1]}" if cfg.admin else ""
        _say(f"relay {__version__}: serving {len(cfg.rooms)} room(s) on {listen}"
             + (f", admin on {admin}" if admin else ""),
             event="serving", version=__version__, rooms=len(cfg.rooms), listen=listen, admin=admin)
        await node.run_until_signalled(
            lambda: load(path=args.config, overrides=_serve_overrides(args)))

    _run(main())


# ------------------------------------------------------------------ listen

def _listen_sinks(args: argparse.Namespace) -> tuple[list[Callable[[bytes], None]], Callable[[], None]]:
    """Where received packets go (an Ogg file, an RTP forward), and what
    closes them at the end."""
    from relay.client.sinks import SinkError, listen_sinks
    try:
        return listen_sinks(args.out, args.forward, args.sdp)
    except SinkError as e:
        _die(str(e))
    raise AssertionError("unreachable")


def cmd_listen(args: argparse.Namespace) -> None:
    from relay.client.listen import FULL_PATIENCE_S, JoinRefused, ListenClient, Unreachable
    from relay.client.signals import until_stopped

    sinks, close_sinks = _listen_sinks(args)
    if args.via and args.quic:
        _die("--via is for UDP listeners (QUIC listeners follow a drain's redirect)")
    server: tuple[str, int] | None = None
    if args.server or not args.via:
        try:
            server = parse_hostport(args.server or ("127.0.0.1:7443" if args.quic else "127.0.0.1:7000"))
        except ValueError as e:
            _die(f"--server: {e}")
    token = args.token or os.environ.get("RELAY_TOKEN", "")

    if (args.cert_hash or args.cafile) and not args.quic:
        _die("--cert-hash and --cafile are for --quic")
    if args.cert_hash and not re.fullmatch(r"[0-9a-fA-F]{64}", args.cert_hash):
        _die("--cert-hash: expected the certificate's SHA-256 as 64 hex digits")
    if args.cafile and not os.access(args.cafile, os.R_OK):
        _die(f"--cafile {args.cafile}: cannot read it")

    async def main() -> int:
        def sink(pkt: bytes) -> None:
            for s in sinks:
                s(pkt)

        client: ListenClient
        if args.quic:
            from relay.client.quic import CertificateMismatch, QuicListenClient
            assert server is not None   # --via is refused with --quic
            client = QuicListenClient(f"{server[0]}:{server[1]}", args.room, token, sink=sink,
                                      cert_sha256=args.cert_hash or "", cafile=args.cafile)
            refused: tuple[type[Exception], ...] = (JoinRefused, CertificateMismatch)
        else:
            client = ListenClient(f"{server[0]}:{server[1]}" if server else "", args.room, token, sink=sink,
                                  via=[f"{u}{'&' if '?' in u else '?'}room={urllib.parse.quote(args.room)}"
                                       f"&token={urllib.parse.quote(token)}" for u in args.via])
            refused = (JoinRefused,)
        client.on_event = lambda text: print(f"relay: {text}", file=sys.stderr, flush=True)
        client.full_patience = FULL_PATIENCE_S
        # aioquic logs a refused certificate itself; we say it once, with the fix
        logging.getLogger("quic").setLevel(logging.CRITICAL)
        try:
            _, stopped = await until_stopped(client.listen(args.duration))
        except refused as e:
            print(f"relay: {e}", file=sys.stderr)
            return 3
        except (TimeoutError, ConnectionError, Unreachable) as e:
            print(f"relay: {e}", file=sys.stderr)
            return 4
        finally:
            await client.aclose()
        stats = client.stats
        print(f"received {stats.received} packets ({stats.bytes} bytes), delivered "
              f"{stats.delivered}, lost {stats.lost}, NACKs {stats.nacks_sent}, "
              f"longest silence {stats.longest_silence:.2f} s", file=sys.stderr)
        if stopped:
            return 0
        if stats.received == 0:
            # joined, yet silence: say it rather than end as if all were well
            print(f"relay: heard no audio from room {args.room!r}: nobody is publishing, or the node drops "
                  f"what is published (its /rooms page shows drops_in)", file=sys.stderr)
            return 5
        return 0

    try:
        code = _run(main())
    except KeyboardInterrupt:
        code = 0    # Ctrl-C before until_stopped took the signals over, or a second one
    finally:
        close_sinks()
    raise SystemExit(code)


# ----------------------------------------------------------------- publish

DEFAULT_INGEST = "127.0.0.1:5004"


def cmd_publish(args: argparse.Namespace) -> None:
    from relay.client.publish import publish_tone, publish_with_ffmpeg
    from relay.client.signals import until_stopped

    if args.token is not None or args.server:
        raise SystemExit(_speak(args))
    if args.out or args.mic:
        _die(f"{'--out records what a speaker hears' if args.out else '--mic speaks on a stage'}: "
             "give --server (and --token) to join a stage")
    try:
        dests = [parse_hostport(d) for d in (args.to or [DEFAULT_INGEST])]
    except ValueError as e:
        _die(f"--to: {e}")
    to = dests if len(dests) > 1 else dests[0]
    if args.file:
        if not os.path.exists(args.file):
            _die(f"--file {args.file}: no such file")
        try:
            raise SystemExit(publish_with_ffmpeg(args.file, to, args.duration))
        except FileNotFoundError as e:
            _die(str(e))
    print(f"publishing a {args.tone:g} Hz tone to {' and '.join(f'{h}:{p}' for h, p in dests)} as RTP/Opus",
          file=sys.stderr)
    try:
        sent, stopped = _run(until_stopped(publish_tone(to, args.tone, args.duration, bitrate=args.bitrate,
                                                        frame_ms=args.frame_ms)))
    except KeyboardInterrupt:
        return    # Ctrl-C before until_stopped took the signals over, or a second one
    if not stopped:
        print(f"sent {sent} packets", file=sys.stderr)


def _speak(args: argparse.Namespace) -> int:
    """`relay publish --server --token`: a speaker on a room's stage."""
    from relay.client.listen import JoinRefused
    from relay.client.ogg import OggOpusWriter
    from relay.client.signals import until_stopped
    from relay.client.sinks import payload
    from relay.client.speak import MicError, file_frames, mic_frames, speak_tone

    frames = None
    if args.file:
        if not os.path.exists(args.file):
            _die(f"--file {args.file}: no such file")
        frames = file_frames(args.file)
    elif args.mic:
        try:
            frames = mic_frames(args.mic)
        except (MicError, FileNotFoundError) as e:
            _die(str(e))
    token = args.token if args.token is not None else os.environ.get("RELAY_TOKEN", "")
    try:
        servers = [parse_hostport(s) for s in (args.server or ["127.0.0.1:7000"])]
    except ValueError as e:
        _die(f"--server: {e}")
    server, also = servers[0], tuple(f"{h}:{p}" for h, p in servers[1:])
    out_file: BinaryIO | None = None
    if args.out:
        try:
            out_file = open(args.out, "wb")
        except OSError as e:
            _die(f"--out {args.out}: {e.strerror}")
    ogg = OggOpusWriter(out_file) if out_file is not None else None
    what = args.file or (f"microphone {args.mic}" if args.mic else f"a {args.tone:g} Hz tone")

    def joined(nodes: list[str]) -> None:
        print(f"speaking {what} on the stage of room {args.room!r} at {' and '.join(nodes)}", file=sys.stderr)
    try:
        stats, stopped = _run(until_stopped(speak_tone(
            f"{server[0]}:{server[1]}", args.room, token, args.tone, args.duration,
            sink=(lambda pkt: ogg.write(payload(pkt))) if ogg else None, bitrate=args.bitrate,
            frames=frames, joined=joined, also=also)))
    except JoinRefused as e:
        print(f"relay: {e}", file=sys.stderr)
        return 3
    except (TimeoutError, ConnectionError) as e:
        print(f"relay: {e}", file=sys.stderr)
        return 4
    except FileNotFoundError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0    # Ctrl-C before until_stopped took the signals over, or a second one
    finally:
        if ogg is not None and out_file is not None:
            ogg.close()
            out_file.close()
    if stopped or stats is None:
        return 0
    print(f"heard {stats.received} packets of the stage without this speaker", file=sys.stderr)
    return 0


# ------------------------------------------------------------------- token

def cmd_host(args: argparse.Namespace) -> None:
    from relay.client.host import TARGET, HostError, call, describe

    if args.action in TARGET and not args.target:
        _die(f"relay host {args.action}: name the {TARGET[args.action]} (relay host {args.action} ID)")
    token = args.token if args.token is not None else os.environ.get("RELAY_TOKEN", "")
    try:
        answer = call(args.server, args.room, token, args.action, args.target or "")
    except HostError as e:
        _die(str(e), 3)
    print(describe(answer) if args.action == "stage" else answer["result"])


def cmd_token(args: argparse.Namespace) -> None:
    from relay.wire.tokens import mint

    secret = os.environ.get(args.secret_env, "")
    if not secret:
        _die(f"set the environment variable {args.secret_env} to the node's secret")
    try:
        print(mint(secret, args.room, args.role, args.ttl, speaker=args.speaker, name=args.name))
    except ValueError as e:
        _die(str(e))


def cmd_check(args: argparse.Namespace) -> None:
    from relay.ops.check import report

    try:
        cfg = load(path=args.config)
    except ConfigError as e:
        _die(str(e))
    raise SystemExit(report(cfg))


def cmd_demo(args: argparse.Namespace) -> None:
    from relay.testing.demo import run_demo

    raise SystemExit(run_demo(args.listeners, args.seconds, args.out, args.frame_ms))


# -------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="Live-audio fan-out relay.")
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="log lines, and serve's own start-up and error lines, as plain text (default) "
                        "or one JSON object each")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a relay node")
    s.add_argument("--config", "-c", help="TOML config file (default: the embedded demo config)")
    s.add_argument("--listen", help="listener UDP address, host:port")
    s.add_argument("--admin", help="admin/metrics HTTP address, host:port ('' to disable)")
    s.add_argument("--open", action="store_true", help="admit listeners without a token")
    s.add_argument("--max-listeners", type=_positive(int), help="listeners this node admits")
    s.add_argument("--quic", help="QUIC and WebTransport listener address, host:port")
    s.add_argument("--hls", help="LL-HLS HTTP port for a CDN to pull, host:port")
    s.add_argument("--public", help="listeners' HTTP (/join, the page) on its own address, host:port; the admin "
                   "port then keeps only the operator's paths")
    s.add_argument("--redirect", help="host:port sent to listeners turned away when full")
    s.add_argument("--workers", help="sender threads, a number or 'auto' (one per core, the default)")
    s.add_argument("--room", action="append", help="NAME=HOST:PORT (replaces the config's rooms)")
    s.add_argument("--source", action="append", help="publisher address allowed into --room rooms")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("listen", help="join a room and receive its audio",
                       epilog="a node that is full and names no other is asked again, waiting longer each "
                              "time, for up to 30 s. exit status: 0 audio heard (or stopped by a signal), "
                              "2 a usage mistake, 3 join refused, 4 no answer from the node, "
                              "5 joined but heard no audio")
    s.add_argument("--server", help="relay listener address (default 127.0.0.1:7000, "
                                    "or 127.0.0.1:7443 with --quic)")
    s.add_argument("--quic", action="store_true", help="join over QUIC (audio as QUIC datagrams)")
    s.add_argument("--via", action="append", default=[], metavar="URL",
                   help="a node's admin /join URL (e.g. http://edge-1:7080/join), asked where to listen "
                        "when the node goes silent, or to start with when --server is not given; repeatable")
    s.add_argument("--cert-hash", help="with --quic: pin the node's certificate by its SHA-256 "
                                       "(hex; the node logs it, and serves it at /quic.json)")
    s.add_argument("--cafile", help="with --quic: trust this CA file instead of the system's")
    s.add_argument("--room", default="demo")
    s.add_argument("--token", help="join token (default: $RELAY_TOKEN)")
    s.add_argument("--out", help="write the audio to this Ogg Opus file")
    s.add_argument("--forward", help="forward RTP to host:port (e.g. for ffplay)")
    s.add_argument("--sdp", help="with --forward: write an SDP file for the player")
    s.add_argument("--duration", type=_positive(float), help="seconds to listen (default: until Ctrl-C)")
    s.set_defaults(func=cmd_listen)

    s = sub.add_parser("publish", help="send RTP/Opus to a room's ingest port, or speak on its stage",
                       epilog="with --server or --token: join the room's stage as a speaker (exit status 3 "
                              "join refused, 4 no answer from the node)")
    s.add_argument("--to", action="append", help=f"the room's ingest address (default {DEFAULT_INGEST}); "
                   "twice for an origin pair: one stream to both")
    s.add_argument("--server", action="append", help="a speaker: the node's listener address (default "
                   "127.0.0.1:7000 with --token); twice for a stage on an origin pair: one encode, sent to both")
    s.add_argument("--room", default="demo", help="a speaker: the stage room (default demo)")
    s.add_argument("--token", help="a speaker: a publish token for the room (default: $RELAY_TOKEN; empty for "
                   "an open node)")
    s.add_argument("--out", help="a speaker: write what it hears (the stage without itself) to this Ogg file")
    s.add_argument("--file", help="publish this file through ffmpeg (a speaker: speak it, then silence)")
    s.add_argument("--mic", nargs="?", const="default", help="a speaker: speak from a microphone (an ALSA "
                   "device, default 'default'; 'pulse:NAME' for PulseAudio), captured by ffmpeg")
    s.add_argument("--tone", type=float, default=440.0, help="tone frequency in Hz (default 440)")
    s.add_argument("--duration", type=_positive(float), help="seconds (default: forever)")
    s.add_argument("--frame-ms", type=int, default=20, choices=[10, 20, 40, 60],
                   help="tone: milliseconds of audio per packet (default 20)")
    s.add_argument("--bitrate", type=_positive(int), default=64000, help="tone: Opus bits/s (default 64000)")
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("host", help="run a room's stage: mute, invite, remove, end (a host's token)")
    s.add_argument("action", choices=["stage", "mute", "unmute", "invite", "audience", "remove", "unban", "end"])
    s.add_argument("target", nargs="?", help="the speaker's id, or the listener's sub")
    s.add_argument("--server", default="http://127.0.0.1:7080", help="the node's HTTP port (admin or public)")
    s.add_argument("--room", default="demo")
    s.add_argument("--token", help="a token of role host for the room (default: $RELAY_TOKEN)")
    s.set_defaults(func=cmd_host)

    s = sub.add_parser("token", help="mint a join token")
    s.add_argument("--room", required=True)
    s.add_argument("--role", default="listen", choices=["listen", "publish", "host"])
    s.add_argument("--speaker", default="", help="the token's subject (sub): a speaker's or a host's id, or a "
                   "listener's (hosts invite and remove by it)")
    s.add_argument("--name", default="", help="role publish: the speaker's display name")
    s.add_argument("--ttl", type=_positive(float), default=3600.0, help="seconds until it expires")
    s.add_argument("--secret-env", default="RELAY_SECRET", help="variable holding the secret")
    s.set_defaults(func=cmd_token)

    s = sub.add_parser("check", help="what on this machine limits a node, and what to change",
                       epilog="exit status: 0 when nothing needs changing, 1 when something should change "
                              "(a line starting 'change' says what), 2 a mistake in the config")
    s.add_argument("--config", "-c", help="the node's TOML config (default: the embedded demo config)")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("demo", help="relay + tone publisher + a crowd of listeners on loopback")
    s.add_argument("--listeners", type=_positive(int), default=2000)
    s.add_argument("--seconds", type=_positive(float), default=10.0)
    s.add_argument("--out", default="demo-listener.ogg", help="one listener's audio goes here")
    s.add_argument("--frame-ms", type=int, default=20, choices=[10, 20, 40, 60],
                   help="milliseconds of audio per packet (default 20: 50 packets/s)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `relay` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.log_format == "json":
        from relay.ops.events import JsonFormatter
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    # aioquic logs every handshake at INFO: noise on a node with many listeners
    logging.getLogger("quic").setLevel(max(logging.WARNING, logging.getLogger().level))
    args.func(args)


if __name__ == "__main__":
    main()
