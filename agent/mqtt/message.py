"""From a spool batch to MQTT messages, the spool's bytes as they are (never re-encoded).

One message per record (`[mqtt] batch = no`): the payload is the record's line. One message per
batch (`batch = yes`, for brokers that bill per message): the batch's records that go to one
topic are joined into a JSON array `[LINE,LINE,...]` (seq order), cut so that no message is
bigger than `max_bytes`. A record whose message alone would be bigger than `max_bytes` (the configured
`max_message_kb`, or less when the broker's CONNACK announces a smaller Maximum Packet Size)
can never be published: the plan stops before it (`Plan.too_big`: its index and size), the output
publishes what comes before it and then quarantines it, so the spool's cursor only moves forward.

The lines before the first line of the earliest message not yet acknowledged are all in
acknowledged messages: that prefix of the batch may be acknowledged in the spool
(agent.mqtt.output, when a connection is lost).
"""

# MQTT PUBLISH overhead besides topic and payload: fixed header (1 + up to 4 length bytes), topic
# length (2), packet id (2), MQTT 5 properties length (1..4): a packet limit minus this and the
# topic's length is what a payload may take.
PACKET_OVERHEAD = 16


class Message:
    """`first`: the batch index of its first line; `count`: its lines (a batch message's lines
    are not always next to each other: records of other topics come between)."""

    __slots__ = ("topic", "payload", "first", "count")

    def __init__(self, topic, payload, first, count):
        self.topic, self.payload, self.first, self.count = topic, payload, first, count

    def __repr__(self):
        return "Message(%r, %d bytes, %d line(s) from %d)" % (self.topic, len(self.payload), self.count, self.first)


class Plan:
    """What one batch becomes: `messages` (ordered by their first line), and `too_big`: (index,
    size) of the line the plan stopped at, or None."""

    __slots__ = ("messages", "too_big")

    def __init__(self):
        self.messages = []
        self.too_big = None


def plan(lines, topic_of, per_batch, max_bytes):
    """`lines`: the batch's lines (bytes); `topic_of(line)` -> topic; `per_batch`: one JSON array
    per topic (the batch's records of that topic, in seq order, cut at the size limit);
    `max_bytes`: the biggest PUBLISH packet allowed (payload + topic + PACKET_OVERHEAD)."""
    out = Plan()
    open_runs = {}      # topic -> [lines, first index, payload size]

    def flush(topic):
        run = open_runs.pop(topic)
        out.messages.append(Message(topic, b"[" + b",".join(run[0]) + b"]", run[1], len(run[0])))

    for i, line in enumerate(lines):
        topic = topic_of(line)
        room = max_bytes - PACKET_OVERHEAD - len(topic.encode("utf-8"))
        if len(line) + (2 if per_batch else 0) > room:
            out.too_big = (i, len(line))
            break
        if not per_batch:
            out.messages.append(Message(topic, line, i, 1))
            continue
        run = open_runs.get(topic)
        if run is not None and run[2] + len(line) + 1 > room:
            flush(topic)
            run = None
        if run is None:
            open_runs[topic] = [[line], i, len(line) + 2]
        else:
            run[0].append(line)
            run[2] += len(line) + 1
    for topic in list(open_runs):
        flush(topic)
    out.messages.sort(key=lambda m: m.first)
    return out
