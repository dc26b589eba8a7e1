"""Which outputs a config enables, and how each is built: the registry (agent.output is the
interface). One entry per output: its spool cursor name, the Config attribute of its section,
the reload tag of that section's keys (agent.config.schema: a change rebuilds the output), and
its builder. An output's module is imported by its builder only, so an HTTP-only agent never
imports paho (the MQTT entry's module).
"""
import os


def _http(cfg):
    from agent.loop import make_uploader

    return make_uploader(cfg)


def _mqtt(cfg):
    from agent.mqtt.output import MqttOutput
    from agent.upload.quarantine import Quarantine

    m = cfg.mqtt
    q = m.quarantine_file or os.path.join(cfg.agent.spool_dir, "mqtt-quarantine.jsonl")
    return MqttOutput(m, cfg.agent.id, quarantine=Quarantine(q, label="mqtt"))


class Entry:
    __slots__ = ("name", "section", "tag", "build")

    def __init__(self, name, section, tag, build):
        self.name, self.section, self.tag, self.build = name, section, tag, build


# In the order the outputs are asked to fill a gap: HTTP first (a request holds the loop for its
# round trip; MQTT only waits in select and takes what is left).
REGISTRY = (Entry("http", "upload", "uploader", _http), Entry("mqtt", "mqtt", "mqtt", _mqtt))
BY_NAME = {e.name: e for e in REGISTRY}


def configured(cfg):
    """The registry entries `cfg` enables (its section is there), in gap order."""
    return [e for e in REGISTRY if getattr(cfg, e.section, None) is not None]


def configured_names(cfg):
    return tuple(e.name for e in configured(cfg))


def build(cfg, skip=()):
    """{name: output} for every configured output except those in `skip`."""
    return {e.name: e.build(cfg) for e in configured(cfg) if e.name not in skip}
