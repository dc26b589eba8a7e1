"""`modbus-agent check`'s lines for [mqtt]: what will be published where. Pure, no paho."""
from agent.common import format_duration, redact
from agent.mqtt.topic import READING, Template
from agent.mqtt.url import parse_url


def check_lines(cfg):
    m = cfg.mqtt
    if m is None:
        return ["mqtt: off (no [mqtt] section)"]
    tls, host, port = parse_url(m.url)
    how = "TLS, %s" % ("certificate NOT checked (insecure = yes)" if m.insecure else
                       "CA %s" % m.ca_file if m.ca_file else "the system's CAs")
    if tls and m.cert_file:
        how += ", client certificate %s" % m.cert_file
    lines = ["mqtt: %s (%s), MQTT %s, client id %s%s, keepalive %s" % (
        redact(m.url), how if tls else "no TLS", m.protocol, m.client_id or cfg.agent.id,
        ", user %s with a password" % m.username if m.password is not None else
        ", user %s" % m.username if m.username else ", no login", format_duration(m.keepalive))]
    lines.append("  qos %d%s, %s, %s, at most %d unacknowledged, messages up to %d kB" % (
        m.qos, " (at least once: a record leaves the spool after its PUBACK)" if m.qos == 1 else
        " (at most once: a record leaves the spool once written to the socket; not confirmed by the broker)",
        "retained" if m.retain else "not retained",
        "one message per batch of up to %d records (JSON array per topic)" % m.batch_max_records if m.batch
        else "one message per record", m.inflight, m.max_message_kb))
    tmpl = Template(m.topic)
    aid = cfg.agent.id
    shown = []
    for d in cfg.devices:
        shown.append("%s -> %s" % (d.name, tmpl.render(aid, d.name, d.unit, READING)))
    if shown:
        lines.append("  topic %s: readings %s" % (m.topic, ", ".join(shown)))
        d = cfg.devices[0]
        lines.append("    health records -> %s, gap records -> %s" % (
            tmpl.render(aid, d.name, d.unit, "health"), tmpl.render(aid, kind="gap")))
    else:
        lines.append("  topic %s (no device enabled)" % m.topic)
    if m.status_topic:
        lines.append("  status topic %s: \"online\" retained after connecting, \"offline\" at a clean stop "
                     "and as the Last Will" % Template(m.status_topic).render(aid))
    else:
        lines.append("  no status topic (status_topic = off)")
    return lines
