"""Alerts raised by the collector: rules in collector.ini ([alert:NAME], [notify:NAME], [alerts]),
evaluated on the records as they are stored and periodically, their state in the database
(schema migration 4), notifications to webhooks through a durable outbox.

    rules.py     the config: Rule, Notifier, AlertConfig; parse() (called by collector/config.py)
    evaluate.py  the state machine (pure): observe() for samples, silent() for silence
    extract.py   a point's samples out of a stored record (agrees with collector/samples.py)
    db.py        the SQL: alert_state, alert_events, alert_outbox, alert_leases
    notify.py    formats (json, slack, discord, telegram) and the HTTP POST
    engine.py    the ingest hook, the periodic evaluator, the senders, the views
    api.py       GET /api/v1/alerts
"""


def attach(app, start=True):
    """An Engine for the app's config and store: its ingest hook registered and (start) its
    threads running. The app closes it (CollectorApp.close)."""
    from agent.collector.alerts.engine import Engine

    engine = Engine(app.cfg.alerts, app.store, clock=app.clock).attach()
    return engine.start() if start else engine
