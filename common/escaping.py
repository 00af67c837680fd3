"""Strings from the network made safe to print: the one escaping helper of logs and operator tables.

A name, a reason or an error message that came over the wire may hold a newline (which would forge a
line in a log), an escape sequence (which would rewrite an operator's terminal) or a bidirectional
override (which would make a line read otherwise than it is). `escaped` writes every character that
is not printable as a visible escape (`\\n`, `\\x1b`, `\\u202e`) and leaves printable text, accents
and other scripts included, as it is; escaping twice changes nothing more.

`escape_logs` installs that rule on a process's log handlers, so no log line of the cloud or an edge
can be split or coloured by what a peer sent, whichever call site logged it. Operator tables
(`cloud.admin.operator_client.table`) escape every cell with the same `escaped`.
"""

from __future__ import annotations

import logging
import traceback

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escaped(text: object) -> str:
    """`text` (made a string) with every non-printable character written as a visible escape."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def fitted(text: str, max_chars: int) -> str:
    """`text` escaped and cut to at most `max_chars` characters (cut ones end in '...')."""
    text = escaped(text)
    return text if len(text) <= max_chars else text[: max(0, max_chars - 3)] + "..."


def _exception_chunks(error: traceback.TracebackException):
    """A traceback as `traceback` formats it, but each exception's own message on one escaped line."""
    if error.__cause__ is not None:
        yield from _exception_chunks(error.__cause__)
        yield "\nThe above exception was the direct cause of the following exception:\n\n"
    elif error.__context__ is not None and not error.__suppress_context__:
        yield from _exception_chunks(error.__context__)
        yield "\nDuring handling of the above exception, another exception occurred:\n\n"
    if error.stack:
        yield "Traceback (most recent call last):\n"
        yield from error.stack.format()
    yield escaped("".join(error.format_exception_only()).rstrip("\n")) + "\n"


class EscapeRecords(logging.Filter):
    """A handler filter: the record's message (arguments filled in) and its exception's message become
    escaped text, so one record is one line plus, for an exception, its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            record.msg, record.args = escaped(message), ()
            if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
                chunks = _exception_chunks(traceback.TracebackException(*record.exc_info))
                record.exc_text = "".join(chunks).rstrip("\n")
        except Exception:  # a record that cannot be formatted is left to the handler's own error path
            pass
        return True


def escape_logs(logger: logging.Logger | None = None) -> None:
    """Escape every record the handlers of `logger` (default: the root logger) write from now on."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, EscapeRecords) for f in handler.filters):
            handler.addFilter(EscapeRecords())
