"""What an answer says: the records' fault (bisect, quarantine) or not (back off), and the hint
for the operator when a configuration change caused it. Pure functions of the batch and the
answer; the table of answers is in agent.upload's docstring."""
import re

from agent.wire import line_agent

# 4xx answers that say nothing about the records themselves: quarantining on them would move a
# whole healthy backlog aside because of a revoked token or a typo in the URL.
RETRY_4XX = frozenset((401, 403, 404, 405, 407, 408, 411, 415, 421, 425, 426, 429))

_RECORD_AGENT = re.compile(r"^\$\.records\[(\d+)\]\.agent$")


def names_a_bad_record(batch, answer):
    """Is this 4xx the collector's verdict on a record (bisect, quarantine) rather than on the
    request (back off)? Only the collector's JSON error names a record; a proxy's HTML 400
    does not. "$.records[i].agent" is a record's fault only when record i carries no agent
    id at all: a real id that differs from the envelope's is a mismatch, not a bad reading."""
    if not isinstance(answer, dict):
        return False
    where, error = answer.get("where"), answer.get("error")
    if not (isinstance(where, str) and isinstance(error, str) and error):
        return False
    m = _RECORD_AGENT.match(where)
    if m:
        i = int(m.group(1))
        return i < batch.count and line_agent(batch.lines[i]) is None
    if where.startswith("$.records["):
        return True
    # malformed JSON located in the body: one of the joined lines (the envelope is ours)
    return where.startswith("body:") or (where == "body" and error.startswith("malformed JSON"))


_RECORD_AT = re.compile(r"^\$\.records\[(\d+)\]")


def bad_record_index(batch, answer):
    """The index of the record the collector's error names ("$.records[i]..."), when it is one
    of this batch's; None otherwise (malformed JSON, a body-level error). The collector checks
    records in order and names the first it refuses, so those before it were fine."""
    where = answer.get("where") if isinstance(answer, dict) else None
    m = _RECORD_AT.match(where) if isinstance(where, str) else None
    if m is None:
        return None
    i = int(m.group(1))
    return i if i < batch.count else None


def hint(batch, agent, agent_id, code, answer):
    """What the operator must do, for the failures a configuration change causes (`agent`: the
    batch's envelope, `agent_id`: [agent] id)."""
    where = answer.get("where") if isinstance(answer, dict) else None
    if agent != agent_id and code in (401, 403):
        return ("the spool still holds records of agent %r (before [agent] id became %r), and the collector "
                "refuses them with this token: keep [agent] id = %s until they are uploaded, or let the "
                "collector accept this token for %r; newer records wait behind them"
                % (agent, agent_id, agent, agent))
    m = _RECORD_AGENT.match(where) if isinstance(where, str) else None
    if m and int(m.group(1)) < batch.count:
        return ("agent id mismatch: the spool's record says %r, the batch says %r, [agent] id is %r; "
                "nothing quarantined" % (line_agent(batch.lines[int(m.group(1))]), agent, agent_id))
    if where == "$.agent" and code not in (401, 403):
        return "the collector refuses the agent id %r ([agent] id); nothing quarantined" % agent
    if code is not None and 400 <= code < 500 and code not in RETRY_4XX and not collector_error(answer):
        return ("HTTP %d is not the collector's answer (a proxy, a firewall, plain HTTP to an HTTPS port?): "
                "check [upload] url; nothing quarantined" % code)
    return None


def collector_error(answer):
    """The collector's error body: {"error": ..., "where": ...}."""
    return isinstance(answer, dict) and isinstance(answer.get("error"), str) and isinstance(answer.get("where"), str)


def timed_out(reason):
    """A read timeout, the total deadline, or a send that timed out (requests wraps that in a
    ConnectionError); not a connect timeout, which says nothing about the batch."""
    return reason.startswith(("ReadTimeout", "TotalTimeout")) or \
        ("timed out" in reason and not reason.startswith("ConnectTimeout"))


def seq_reuse(batch, agent, dups, max_seq, ours):
    """The ERROR to log when a stored answer is the signature of a seq that went back or of a
    second router with the same [agent] id (None otherwise): every record already there, and
    the collector holds seqs beyond `ours`, the highest this agent can have sent. A resend (lost
    or late answer, a halved batch, a lagging cursor after a restart) never looks like this:
    the collector's max would be at most `ours`."""
    if not (dups == batch.count and type(max_seq) is int and max_seq > ours):
        return None
    return ("upload: the collector already holds all %d records seq %d..%d of agent %r and has seqs "
            "up to %d, beyond any this agent has sent (%d): these readings are being DISCARDED as "
            "duplicates, and new ones will be at least until its seq passes %d. Either another "
            "router sends as %r too (each needs its own [agent] id), or this agent's seq went back "
            "(spool state lost or rolled back: fsync = never and a power cut, or spool_dir and "
            "seq_file both replaced while the clock was unset); a new [agent] id for this agent "
            "stops the loss of new readings"
            % (batch.count, batch.first_seq, batch.last_seq, agent, max_seq, ours, max_seq, agent))
