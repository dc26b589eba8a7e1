"""modbus-agent: a store-and-forward Modbus data logger for small routers.

Where things are:
  agent/modbus/     the codec (CRC, PDU, RTU/TCP framing) and the transports
  agent/config/     the INI file, parsed once into typed objects
  agent/loop.py     the single-threaded loop (polling.py, gaps.py, appender.py, summary.py beside it)
  agent/spool/      the crash-safe rotating JSON-lines spool, one cursor per output
  agent/output.py   what the loop asks of an output; agent/upload/ is the HTTP one
  agent/wire.py     the line format shared by record, spool, upload and the collector
  agent/common.py   helpers the agent and the collector share
  agent/collector/  the WSGI collector
See ARCHITECTURE.md.
"""

__version__ = "0.1.0"
