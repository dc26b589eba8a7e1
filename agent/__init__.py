"""modbus-agent: a store-and-forward Modbus data logger for small routers.

Where things are:
  agent/modbus/     the codec (CRC, PDU, RTU/TCP framing) and the transports
  agent/config/     the INI file, parsed once into typed objects
  agent/loop.py     the single-threaded polling/spooling/uploading loop
  agent/spool.py    the crash-safe rotating JSON-lines spool
  agent/upload.py   bulk upload to the collector
  agent/collector/  the WSGI collector
"""

__version__ = "0.1.0"
