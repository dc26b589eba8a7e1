"""The Modbus TCP gateway of cached readings: local SCADA/HMI read the same meters without
polling a slow RS-485 bus a second time.

    answer.py   pure: a request ADU -> the answer ADU from the devices' cached blocks
                (agent.device `Device.blocks`: the raw bytes of each planned read's last good
                answer), the exception rules
    server.py   I/O: `Gateway`, an agent.service.Service: the non-blocking listener and its
                clients, served by the loop in the gaps between polls

Read-only by design: a write gets exception 01 and never reaches the bus. Built by the loop only
when the config has a [gateway] section (`make_services`), so an agent without it imports none
of this.
"""


def make_gateway(cfg, states=()):
    """The [gateway] service for `cfg`, None without the section."""
    if cfg.gateway is None:
        return None
    from agent.gateway.server import Gateway

    return Gateway(cfg.gateway, states)
