"""What every route of the collector's WSGI app shares: the error that becomes a 4xx/5xx answer,
status lines, JSON answers, and the environ keys that carry a request's agent to the log line."""
from agent.collector.jsonbody import encode

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            415: "Unsupported Media Type", 422: "Unprocessable Entity", 500: "Internal Server Error",
            503: "Service Unavailable"}
AGENT_KEY = "modbus_collector.agent"  # environ: the batch's agent id, once read
TOKEN_AGENT_KEY = "modbus_collector.token_agent"  # environ: the agent the token belongs to


class HTTPError(Exception):
    """A request the app refuses: answered {"error": error, "where": where} with `status`."""

    def __init__(self, status, error, where="", headers=()):
        super().__init__(error)
        self.status = status
        self.error = error
        self.where = where
        self.headers = list(headers)


def status(code):
    return "%d %s" % (code, _REASONS.get(code, "Unknown"))


def json_answer(start_response, code, obj, headers=()):
    body = (encode(obj) + "\n").encode("utf-8")
    start_response(status(code), [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))] + list(headers))
    return [body]
