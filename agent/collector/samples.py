"""The readings inside one stored data record, whether it holds one poll or several.

A buffered record (`[device] buffer = N` on the agent) carries N polls of one device:

    {"agent": "a1", "seq": 17, "ts": <newest sample's ts>, "device": "m1", "unit": 1,
     "values": {<newest sample's values>}, "status": "ok",
     "samples": [{"ts": "2026-12-01T10:00:00.000Z", "values": {...}}, ...]}   # oldest first, newest included

so a reader that knows nothing of buffering still sees the device's latest reading in "ts"/"values".
Everything that looks at values over time (series, rollups, exports, alerts) goes through
`samples()` instead of reading "values" itself.
"""


def samples(record):
    """[(ts, values)] of a data record (a dict): each buffered sample in order, else the record's
    own (ts, values); [] when it carries no values (an error record). Malformed samples (not an
    object, no ts string, values not an object) are skipped: validation refuses them at ingest."""
    buf = record.get("samples")
    if type(buf) is list:
        out = []
        for s in buf:
            if type(s) is dict and type(s.get("ts")) is str and type(s.get("values")) is dict:
                out.append((s["ts"], s["values"]))
        return out
    values = record.get("values")
    if type(values) is dict:
        return [(record.get("ts"), values)]
    return []
