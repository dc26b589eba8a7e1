"""Modbus clients: the transports that move the codec's frames (the one place to import them).

    TcpClient          Modbus TCP (MBAP) on a socket                               tcp_client.py
    RtuClient          RTU on a serial line (pyserial), with 3.5-character silence rtu_client.py
                       and RS-485 echo
    RtuOverTcpClient   RTU frames on a socket, as serial-to-Ethernet gateways speak rtu_client.py
    AsciiClient        Modbus ASCII on a serial line (':' hex, LRC, CR LF)         ascii_client.py
    AsciiOverTcpClient ASCII frames on a socket                                    ascii_client.py

Their shared base (public read/write methods, argument checks, stats, back-off) is
`base.Client`; the byte links under the RTU clients and `open_tcp` are in `links.py`.

All of them connect lazily, raise only `agent.modbus.errors` types with unit, function code,
address and count filled in, and keep counters in `.stats` (uploaded as device health).

Robustness rules (each answers a known field problem):
- a stale reply (older transaction id, a late RTU answer to an earlier request) is discarded
  and reading goes on; it is never returned as the answer;
- a TCP stream that is out of sync (bad MBAP header, unknown transaction id) is closed and
  reopened, and the request sent once more on the fresh connection;
- after a lost connection, reconnects back off exponentially (one attempt per step, up to
  `backoff_max`); inside the window the call fails at once without touching the network
  (the agent's loop shortens that to `down_hold`: its device schedule owns the back-off);
  a connection the peer closed while idle is reopened once at once (gateways do that);
- one deadline per request (`timeout` from the send, covering every read and the resend after
  an out-of-sync stream), so a peer that dribbles bytes cannot stretch a request; a truncated
  TCP answer closes the link (its rest must not be read as the next answer);
- two timeouts in a row on a socket (Modbus TCP, RTU over TCP) close the connection (a
  half-open link only shows as silence); the next call opens a fresh one;
- RTU: a read answer of this unit and function with another byte count is a late answer and
  skipped; after a timeout the next request waits out a late-answer window first (see
  `rtu_client._RtuBase` for it and for the blind spot that remains);
- RTU: the exception-sized prefix (5 bytes) is read first, so an exception reply never costs
  a timeout; stale input is dropped before sending; `pause` and the 3.5-character silence are
  kept between exchanges; noise before the answer is skipped byte by byte until a frame starts;
  with `rs485_echo` our own request, echoed by the adapter, is read and checked first;
  unit 0 is broadcast: writes get no answer, reads are refused.

Hot path (TCP read): one `struct` pack, one `sendall`, one `recv` that normally holds the
whole answer, one unpack to check it; no timeout syscalls unless the answer comes in pieces.
"""
from agent.modbus.ascii_client import AsciiClient, AsciiOverTcpClient
from agent.modbus.base import STAT_KEYS, Client
from agent.modbus.links import open_tcp
from agent.modbus.rtu_client import (
    BROADCAST_TURNAROUND,
    LATE_QUIET,
    LATE_WINDOW_MAX,
    LATE_WINDOW_MIN,
    LATE_WINDOW_SHARE,
    RtuClient,
    RtuOverTcpClient,
)
from agent.modbus.tcp_client import TcpClient

__all__ = ["AsciiClient", "AsciiOverTcpClient", "BROADCAST_TURNAROUND", "LATE_QUIET", "LATE_WINDOW_MAX", "LATE_WINDOW_MIN",
           "LATE_WINDOW_SHARE", "STAT_KEYS", "Client", "RtuClient", "RtuOverTcpClient",
           "TcpClient", "open_tcp"]
