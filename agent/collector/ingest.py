"""The collector's write endpoints: POST /api/v1/batches (the agents' batches) and POST
/receive-data (the legacy single-record format).

A batch in the agent's own encoding takes the fast path (fastpath.fast_head/fast_rows: one regex
per record); anything else, or anything the fast path cannot accept, the general path (parse_batch
then batch_rows: every check, the precise error). Either way the rows go to the store in one
transaction. Order of checks: auth, body (app.read_body: type, encoding, size, gzip), JSON, the
token's agent against the body's (403), validation (422 naming the JSON path).
"""
import hashlib
import logging
import time

from agent.collector import fastpath, jsonbody, legacy, validate
from agent.collector.web import AGENT_KEY, TOKEN_AGENT_KEY, HTTPError, json_answer

log = logging.getLogger("modbus.collector")
JSON_TYPES = ("application/json",)
LEGACY_TYPES = ("application/json", "text/json", "text/plain", "application/x-www-form-urlencoded", "")


def _hasher(data):
    return hashlib.blake2b(data, digest_size=8).digest()


def post_batches(app, environ, start_response):
    t0 = time.monotonic()
    cfg = app.cfg
    token_agent = app.token_agent(environ) if cfg.tokens_required else None
    if token_agent is not None:
        environ[TOKEN_AGENT_KEY] = token_agent
    body = app.read_body(environ, JSON_TYPES)
    received = app.clock()
    max_ts, limits = app.max_ts(received), app.json_limits
    rows = head = None
    try:
        text, body = body.decode("utf-8"), None  # one copy of the body at a time
    except UnicodeDecodeError:
        text = None  # the general path says where
    if text is not None and "\\" not in text:  # no escapes at all: no NUL or surrogate to look for
        head = fastpath.fast_head(text)
    if head is not None:
        agent = environ[AGENT_KEY] = head[0]
        if token_agent is not None and agent != token_agent:
            raise HTTPError(403, "token belongs to another agent", "$.agent")
        rows = fastpath.fast_rows(text, head[1], agent, received, cfg.max_records, cfg.max_depth,
                                  max_ts, limits)
    if rows is None:  # the general path: any shape, every check, precise errors
        max_records = cfg.max_records
        doc = app.parse_json(body if text is None else text, lambda t: jsonbody.parse_batch(t, max_records),
                             limits, pairs=True)
        if type(doc) is dict and "agent" in doc:
            environ[AGENT_KEY] = doc["agent"]
        if token_agent is not None and type(doc) is dict and doc.get("agent") != token_agent:
            raise HTTPError(403, "token belongs to another agent", "$.agent")
        try:
            agent, rows = validate.batch_rows(doc, received, cfg.max_records, cfg.max_depth, max_ts)
        except validate.Invalid as e:
            raise HTTPError(422, e.reason, e.path) from None
        except validate.TooMany as e:
            raise HTTPError(413, str(e), e.where) from None
        doc = None
    text = None  # the rows hold each record's text: the body and what was parsed go before storing
    stored, dups, max_seq = app.store.ingest(agent, rows, received)
    app.counters.batch("/api/v1/batches", stored, dups)
    log.debug("batch from %s: %d stored, %d duplicates, max_seq %s, %.1f ms",
              agent, stored, dups, max_seq, (time.monotonic() - t0) * 1000)
    return json_answer(start_response, 200, {"stored": stored, "duplicates": dups, "max_seq": max_seq})


def post_receive_data(app, environ, start_response):
    cfg = app.cfg
    mode = cfg.receive_data_mode
    if mode == "closed":
        raise HTTPError(404, "/receive-data is closed on this collector", "receive_data")
    agent = app.token_agent(environ) if mode == "token" else cfg.receive_data_agent
    environ[AGENT_KEY] = agent
    doc = app.read_json(environ, LEGACY_TYPES)
    received = app.clock()
    recs, prefix = (doc, "$") if type(doc) is list else ([doc], None)
    if len(recs) > cfg.max_records:
        raise HTTPError(413, "%d records in one post, more than max_records %d"
                        % (len(recs), cfg.max_records), "$")
    try:
        max_ts = app.max_ts(received)
        rows = [legacy.legacy_row(r, agent, received, "%s[%d]" % (prefix, i) if prefix else "$",
                                    cfg.max_depth, _hasher, max_ts) for i, r in enumerate(recs)]
    except validate.Invalid as e:
        raise HTTPError(422, e.reason, e.path) from None
    # Content-hash seqs, negative: outside the agents' seqs, they never move max_seq.
    stored, dups, _ = app.store.ingest(agent, rows, received)
    app.counters.batch("/receive-data", stored, dups)
    return json_answer(start_response, 200, {"stored": stored, "duplicates": dups})
