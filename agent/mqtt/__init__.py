"""The MQTT output: the spool published to a broker, in the gaps between polls ([mqtt]).

    url.py       [mqtt] url -> (tls, host, port)                              pure
    topic.py     topic templates, their checks, a spool line's fields         pure
    message.py   a spool batch -> messages (per record, or JSON arrays)       pure
    session.py   one connection, paho-mqtt driven from the gaps (no thread)   imports paho
    output.py    MqttOutput: the agent.output.Output, delivery and failures   imports paho

Only agent.outputs imports session/output, and only when [mqtt] is configured: an HTTP-only
agent never imports paho (tests/test_mqtt_config.py checks sys.modules). The delivery rules are
in output.py's docstring.
"""
