"""modbus-collector: receives the agents' batches over HTTP and stores them (SQLite or PostgreSQL).

A plain WSGI callable, stdlib only (psycopg for the PostgreSQL option):

    from agent.collector import make_app
    app = make_app("conf/collector.ini")                 # or make_app(None, db="sqlite:///x.db")

Production: `gunicorn -w 4 'agent.collector:make_app("conf/collector.ini")'` or
`waitress-serve --call 'agent.collector:make_app'` (config from MODBUS_COLLECTOR_CONFIG).
"""
import copy
import os


def make_app(config=None, **overrides):
    """Config path (or None: built-in defaults, or $MODBUS_COLLECTOR_CONFIG) plus overrides
    (db=, tokens=, max_records=, ...) -> the WSGI application, schema migrated, retention started."""
    from agent.collector.app import CollectorApp
    from agent.collector.config import Config, load_config
    from agent.collector.store import open_store

    store = overrides.pop("store", None)
    clock = overrides.pop("clock", None)
    if isinstance(config, Config):
        cfg = copy.copy(config)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
    else:
        if config is None:
            config = os.environ.get("MODBUS_COLLECTOR_CONFIG") or None
        cfg = load_config(config, **overrides)
    kw = {"clock": clock} if clock else {}
    # The store lets a newer batch take over a device's "last" record from one stamped more than
    # this far ahead of its arrival: the same limit ingest refuses beyond (one fact, one key).
    skew = min(cfg.max_future_skew, 3650 * 86400.0) if cfg.max_future_skew and cfg.max_future_skew > 0 else None
    app = CollectorApp(cfg, store or open_store(cfg.db, future_skew=skew), **kw)
    app.start_retention()
    if cfg.alerts:
        from agent.collector.alerts import attach

        app.alerts = attach(app)
    from agent.collector import rollup

    app._rollup_thread = rollup.start(app)  # the rollups' ingest hook; backfill, their retention
    return app
