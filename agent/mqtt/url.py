"""`[mqtt] url`: mqtt://host[:port] (1883) or mqtts://host[:port] (8883, TLS). Pure, no paho."""
import re

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_URL = re.compile(r"^(mqtts?)://(\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]?#]+)(?::(\d{1,5}))?/?$", re.I)


def parse_url(text):
    """-> (tls, host, port), or ValueError naming what is wrong."""
    t = text.strip()
    if "@" in t.split("://", 1)[-1]:
        raise ValueError("%r holds user:password@: put them in [mqtt] username / password" % _shown(t))
    m = _URL.match(t)
    if m is None:
        raise ValueError("%r is not mqtt://host[:port] or mqtts://host[:port]" % _shown(t))
    scheme = m.group(1).lower()
    host = m.group(2)
    if host.startswith("["):
        host = host[1:-1]
    port = int(m.group(3)) if m.group(3) else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError("%r: port %d is not 1..65535" % (t, port))
    return scheme == "mqtts", host, port


def _shown(text):
    from agent.common import redact

    return redact(text)
