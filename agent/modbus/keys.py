"""What a transport takes from its [connection:NAME] section: the keys, declared as data.

A client class lists its keys in `KEYS` (see `agent.modbus.transport`); agent.config turns each
`Key` into a value parser, reports bad values with their line, and fills in the defaults. This
module knows nothing of the config, so the codec never imports it.

The groups below are shared: a new transport on a socket or a serial line takes them as they
are and adds its own.
"""

#: default of a key that must be given
REQUIRED = object()

#: how a key's text is read (agent.config.schema.key_parser):
#:   text      stripped text, None when empty
#:   path      a device path, kept as written; empty is an error
#:   int       a whole number (decimal or 0x hex): `positive`, or within `bounds` (inclusive)
#:   duration  500ms, 10s, 5m, 1h, 7d or seconds: `positive`, or at least 0
#:   bool      yes/no, true/false, on/off, 1/0
#:   choice    one of `choices` (upper-case spellings, matched in any case)
KINDS = ("text", "path", "int", "duration", "bool", "choice")


class Key:
    """One [connection] key: its name, how its value is read, its default, and a hint for the
    operator (named in "missing" and "empty" errors)."""

    __slots__ = ("bounds", "choices", "default", "hint", "kind", "name", "positive")

    def __init__(self, name, kind, default=None, positive=False, bounds=None, choices=None,
                 hint=None):
        if kind not in KINDS:
            raise ValueError("unknown key kind %r" % kind)
        self.name = name
        self.kind = kind
        self.default = default
        self.positive = positive
        self.bounds = bounds
        self.choices = choices
        self.hint = hint

    def same_value(self, other):
        """Whether `other` reads its text the same way (its default may differ)."""
        return (self.kind, self.positive, self.bounds, self.choices, self.hint) == (
            other.kind, other.positive, other.bounds, other.choices, other.hint)

    def __repr__(self):
        return "Key(%r, %r, %r)" % (self.name, self.kind, self.default)


def timeout_key(default):
    """Every transport's answer timeout; its default is the transport's."""
    return Key("timeout", "duration", default, positive=True)


#: every transport's: the pause kept between requests, the cap of the reconnect back-off
LINK_KEYS = (Key("pause", "duration", 0.0),
             Key("backoff_max", "duration", 60.0, positive=True))

#: a device or gateway on TCP
SOCKET_KEYS = (Key("host", "text", REQUIRED),
               Key("port", "int", 502, bounds=(1, 65535)))
CONNECT_TIMEOUT = Key("connect_timeout", "duration", None, positive=True)   # None: the timeout

#: a serial line; on RTU over TCP they describe the bus behind the gateway (for `check` only)
SERIAL_LINE_KEYS = (Key("baud", "int", 9600, positive=True),
                    Key("parity", "choice", "N", choices=("N", "E", "O")),
                    Key("bytesize", "int", 8, bounds=(7, 8)),
                    Key("stopbits", "int", 1, bounds=(1, 2)))
SERIAL_PORT = Key("port", "path", REQUIRED, hint="the serial device, e.g. /dev/ttyUSB0")
