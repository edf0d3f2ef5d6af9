"""QMP, the wire protocol, without sockets: bytes in, JSON objects out, and one client's session.

* :class:`JsonStream` cuts a byte stream into JSON texts the way QEMU's json-streamer does: by
  counting brace and bracket depth outside strings, so a message may span reads and lines and
  several may share one.  A text that does not parse becomes a :class:`ParseError` item in the
  output and the stream carries on after it -- a typo costs the client one error reply, not
  its connection.  Input nested too deep or too long is refused and skipped up to the next
  newline, where parsing starts afresh (whatever brackets the rest of that line leaves open).
* :class:`QmpSession` is one client's state: the greeting, capability negotiation
  (``qmp_capabilities`` first), the checks QEMU makes on every input object, and the ``id``
  echoed into the reply.  Every input gets a reply: a command that fails in a way nobody
  foresaw is a GenericError reply and a (rate-limited) log line, never an exception that
  would end the server thread.  Commands themselves are a callable the session is given
  (:mod:`.commands`), so every reply is a unit test.

Replies and events are serialised as one line each, ``\\r\\n``-terminated, like QEMU's monitor.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockdev.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)



def internal_error_log() -> RateLimitedLog:
    """Where unexpected command failures are logged (with their traceback): a client that
    repeats one cannot fill the journal.  One per server, shared by its sessions."""
    return RateLimitedLog(log, burst=5, interval=60.0)

#: The largest JSON text accepted (QEMU's streamer limit is 64 MiB; nothing we take needs 1).
MAX_MESSAGE = 1 << 20
#: Nesting deeper than this is refused (QEMU: 1024).
MAX_DEPTH = 1024


class QmpError(Exception):
    """A command failed: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def generic_error(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


@dataclass(frozen=True)
class ParseError:
    """A JSON text in the stream that could not be parsed."""

    reason: str


class JsonStream:
    """Split a byte stream into JSON values (``feed`` returns the complete ones so far)."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0  # scanned up to here
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skip_line = False  # after an oversized or too deep text

    def feed(self, data: bytes) -> list[Any]:
        """Append ``data``; return every value completed by it (ParseError for bad ones)."""
        out: list[Any] = []
        if self._skip_line:
            end = data.find(b"\n")
            if end < 0:
                return out
            data = data[end + 1:]
            self._skip_line = False
        self._buf += data
        buf = self._buf
        i = self._pos
        n = len(buf)
        while i < n:
            c = buf[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:  # "
                    self._in_string = False
                i += 1
                continue
            if c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):  # { [
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    out.append(ParseError("JSON nesting too deep"))
                    self._skip_to_newline(buf, i)
                    i, n = 0, len(buf)
                    continue
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth <= 0:
                    out.append(self._parse(bytes(buf[: i + 1])))
                    del buf[: i + 1]
                    self._depth = 0
                    i, n = 0, len(buf)
                    continue
            elif self._depth == 0 and c in b" \t\r\n":
                if i:  # a bare scalar (or garbage) at the top level ends at whitespace
                    out.append(self._parse(bytes(buf[:i])))
                del buf[: i + 1]
                i, n = 0, len(buf)
                continue
            i += 1
        self._pos = i
        if len(buf) > self.max_message:
            out.append(ParseError(f"JSON message larger than {self.max_message} bytes"))
            self._skip_to_newline(buf, len(buf))
            out.extend(self.feed(b""))
        return out

    def _skip_to_newline(self, buf: bytearray, start: int) -> None:
        """Drop the text being read and the rest of its line (which may not have come yet)."""
        end = buf.find(b"\n", start)
        if end < 0:
            buf.clear()
            self._skip_line = True
        else:
            del buf[: end + 1]
        self._pos = 0
        self._depth = 0
        self._in_string = self._escape = False

    @staticmethod
    def _parse(text: bytes) -> Any:
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return ParseError(f"JSON parse error, {exc}")


def encode(obj: dict[str, Any]) -> bytes:
    """One QMP message on the wire."""
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


def timestamp(now: float | None = None) -> dict[str, int]:
    """QMP's event timestamp: wall-clock seconds and microseconds."""
    t = time.time() if now is None else now
    seconds = int(t)
    return {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)}


def event(name: str, data: dict[str, Any] | None = None, now: float | None = None
          ) -> dict[str, Any]:
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = timestamp(now)
    return msg


#: Executes one command: (name, arguments) -> the ``return`` value, or raises QmpError.
Execute = Callable[[str, dict[str, Any]], Any]

_ALLOWED_KEYS = ("execute", "arguments", "id")


class QmpSession:
    """One client: negotiation state and the input checks; commands go to ``execute``."""

    def __init__(self, execute: Execute, version: dict[str, Any],
                 errors: RateLimitedLog | None = None) -> None:
        self.execute = execute
        self.version = version
        self.negotiated = False
        self.errors = errors if errors is not None else internal_error_log()

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self.version, "capabilities": []}}

    def handle(self, item: Any) -> dict[str, Any]:
        """The reply to one input item (a parsed JSON value or a ParseError)."""
        if isinstance(item, ParseError):
            return _error("GenericError", item.reason)
        if not isinstance(item, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        try:
            name, args = self._check(item)
            if not self.negotiated:
                if name != "qmp_capabilities":
                    raise QmpError("CommandNotFound",
                                   "Expecting capabilities negotiation with 'qmp_capabilities'")
                self._capabilities(args)
                self.negotiated = True
                result: Any = {}
            elif name == "qmp_capabilities":
                raise QmpError("CommandNotFound",
                               "Capabilities negotiation is already complete, command ignored")
            else:
                result = self.execute(name, args)
        except QmpError as exc:
            reply = _error(exc.cls, exc.desc)
        except Exception as exc:  # a bug or an unforeseen failure: this command fails, not QMP
            self.errors.log(logging.ERROR, "QMP command %r failed unexpectedly",
                            item.get("execute"), exc_info=True)
            reply = _error("GenericError", f"internal error: {type(exc).__name__}: {exc}")
        else:
            reply = {"return": result}
        if "id" in item:
            reply["id"] = item["id"]
        return reply

    @staticmethod
    def _check(item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if "exec-oob" in item:
            raise generic_error("QMP input member 'exec-oob' is unexpected (out-of-band "
                                "execution is not offered)")
        for key in item:
            if key not in _ALLOWED_KEYS:
                raise generic_error(f"QMP input member '{key}' is unexpected")
        if "execute" not in item:
            raise generic_error("QMP input lacks member 'execute'")
        name = item["execute"]
        if not isinstance(name, str):
            raise generic_error("QMP input member 'execute' must be a string")
        args = item.get("arguments", {})
        if not isinstance(args, dict):
            raise generic_error("QMP input member 'arguments' must be an object")
        return name, args

    @staticmethod
    def _capabilities(args: dict[str, Any]) -> None:
        for key, value in args.items():
            if key != "enable":
                raise generic_error(f"Parameter '{key}' is unexpected")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise generic_error("Invalid parameter type for 'enable', expected: array")
            for cap in value:  # we offer none (no out-of-band execution)
                raise generic_error(f"Capability '{cap}' not available")


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
