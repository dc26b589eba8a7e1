"""The Modbus codec (pure: bytes in, values out) and the transports that move its bytes.

Codec (pure):   pdu.py (the function-code table: limits, lengths, the exception check),
                rtu.py (RTU framing and serial timing), tcp.py (MBAP framing), ascii.py
                (Modbus ASCII framing, LRC), crc.py, errors.py
Transports:     client.py (the rules; imports of the clients), base.py (their shared base),
                tcp_client.py, rtu_client.py (RTU serial and over TCP), ascii_client.py
                (ASCII serial and over TCP), links.py (byte links)
Registry:       transport.py (TRANSPORTS: connection type -> client, keys, bus time), keys.py
"""
from agent.modbus.errors import (
    AgentError,
    ConnectionLost,
    CRCError,
    DeviceError,
    FrameError,
    InvalidRequest,
    ModbusError,
    ModbusTimeout,
)

__all__ = [
    "AgentError",
    "CRCError",
    "ConnectionLost",
    "DeviceError",
    "FrameError",
    "InvalidRequest",
    "ModbusError",
    "ModbusTimeout",
]
