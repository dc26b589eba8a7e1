"""From a spool batch to MQTT messages, the spool's bytes as they are (never re-encoded).

One message per record (`[mqtt] batch = no`): the payload is the record's line. One message per
batch (`batch = yes`, for brokers that bill per message): consecutive records that go to the same
topic are joined into a JSON array `[LINE,LINE,...]`, cut so that no message is bigger than
`max_bytes`. A record whose message alone would be bigger than `max_bytes` (the configured
`max_message_kb`, or less when the broker's CONNACK announces a smaller Maximum Packet Size)
can never be published: the plan stops before it (`Plan.too_big`: its index and size), the output
publishes what comes before it and then quarantines it, so the spool's cursor only moves forward.

A message is `(topic, payload, first, end)`: lines first..end-1 of the batch (seq order kept).
"""

# MQTT PUBLISH overhead besides topic and payload: fixed header (1 + up to 4 length bytes), topic
# length (2), packet id (2), MQTT 5 properties length (1..4): a packet limit minus this and the
# topic's length is what a payload may take.
PACKET_OVERHEAD = 16


class Message:
    __slots__ = ("topic", "payload", "first", "end")

    def __init__(self, topic, payload, first, end):
        self.topic, self.payload, self.first, self.end = topic, payload, first, end

    @property
    def count(self):
        return self.end - self.first

    def __repr__(self):
        return "Message(%r, %d bytes, lines %d..%d)" % (self.topic, len(self.payload), self.first, self.end - 1)


class Plan:
    """What one batch becomes: `messages` in seq order, and `too_big`: (index, size) of the line the
    plan stopped at, or None."""

    __slots__ = ("messages", "too_big")

    def __init__(self):
        self.messages = []
        self.too_big = None


def plan(lines, topic_of, per_batch, max_bytes):
    """`lines`: the batch's lines (bytes); `topic_of(line)` -> topic; `max_bytes`: the biggest
    PUBLISH packet allowed (payload + topic + PACKET_OVERHEAD)."""
    out = Plan()
    run, run_topic, run_first, run_size = [], None, 0, 0
    room = 0

    def flush(end):
        if run:
            payload = run[0] if not per_batch else b"[" + b",".join(run) + b"]"
            out.messages.append(Message(run_topic, payload, run_first, end))

    for i, line in enumerate(lines):
        topic = topic_of(line)
        room = max_bytes - PACKET_OVERHEAD - len(topic.encode("utf-8"))
        size = len(line) + (2 if per_batch else 0)
        if size > room:
            flush(i)
            out.too_big = (i, len(line))
            return out
        if per_batch and run and topic == run_topic and run_size + len(line) + 1 <= room:
            run.append(line)
            run_size += len(line) + 1
            continue
        flush(i)
        run, run_topic, run_first, run_size = [line], topic, i, len(line) + 2
        if not per_batch:
            flush(i + 1)
            run = []
    flush(len(lines))
    return out
