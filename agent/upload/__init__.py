"""The HTTP output: drains the spool to the collector in bulk batches, in the gaps between polls.

    uploader.py    Uploader: drain (the gap rule), batches (one agent each, 413 split, bisect),
                   the POST and its answer, back-off; the loop drives it as an agent.output.Output
    timing.py      RequestTimes: how long requests take, which gaps can start one
    deadline.py    Alarm: one request's total deadline; read_answer: the answer's bounded read
    verdict.py     what an answer says: the records' fault (quarantine) or not (back off)
    quarantine.py  Quarantine: the bounded file of records the collector rejected

The wire format and the table of answers are in agent.upload.uploader's docstring.
"""
from agent.upload.deadline import ANSWER_MAX, RequestDeadline
from agent.upload.quarantine import Quarantine
from agent.upload.timing import CONNECT_PRIOR, REQUEST_PRIOR
from agent.upload.uploader import BACKOFF_BASE, GZIP_LEVEL, NO_ANSWER_BACKOFF, Uploader
from agent.upload.verdict import RETRY_4XX

__all__ = ["ANSWER_MAX", "BACKOFF_BASE", "CONNECT_PRIOR", "GZIP_LEVEL", "NO_ANSWER_BACKOFF", "Quarantine",
           "REQUEST_PRIOR", "RETRY_4XX", "RequestDeadline", "Uploader"]
