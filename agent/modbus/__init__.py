"""The Modbus codec (pure: bytes in, values out) and the transports that move its bytes."""
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
