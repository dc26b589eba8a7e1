"""The transport registry: every connection type the agent speaks, one line each.

    TRANSPORTS["rtu"].open(connection)           -> RtuClient (connects lazily)
    TRANSPORTS[c.type].bus_time(c, [(3, 125)])   -> {"requests", "bytes", "seconds"}

A `Transport` presents what its client class declares (agent.modbus.base.Client):
    name      the [connection] `type` (`TYPE`)
    serial    its devices sit on an RTU bus: units 1..247, bus time is serial time (`SERIAL`)
    keys      {key: agent.modbus.keys.Key} it takes, in order (`KEYS`); agent.config parses
              them, rejects the others and fills in the defaults
    open(settings) -> a client for a connection (`from_settings`)
    describe(settings) -> the connection in messages ("rtu /dev/ttyUSB0 9600 8N1")
    bus_time(settings, reads) -> the estimate `check` adds up per connection
`settings` is any object with the transport's keys as attributes (agent.config's Connection).

A new transport (Modbus ASCII was the last) is its client module and one line in TRANSPORTS; the
config, `check`, the loop and the commands need no change.
"""
from agent.modbus.ascii_client import AsciiClient, AsciiOverTcpClient
from agent.modbus.rtu_client import RtuClient, RtuOverTcpClient
from agent.modbus.tcp_client import TcpClient


class Transport:
    """One connection type, as its client class declares it."""

    __slots__ = ("client", "keys", "name", "serial")

    def __init__(self, client):
        self.client = client
        self.name = client.TYPE
        self.serial = client.SERIAL
        self.keys = {k.name: k for k in client.KEYS}

    def open(self, settings):
        return self.client.from_settings(settings)

    def describe(self, settings):
        return self.client.describe(settings)

    def bus_time(self, settings, reads):
        return self.client.bus_time(settings, reads)

    def __repr__(self):
        return "<Transport %s: %s>" % (self.name, self.client.__name__)


#: connection type -> Transport, in the order the docs list them
TRANSPORTS = {t.name: t for t in (
    Transport(TcpClient),
    Transport(RtuClient),
    Transport(RtuOverTcpClient),
    Transport(AsciiClient),
    Transport(AsciiOverTcpClient),
)}
