"""`modbus-collector [-c FILE] [--listen HOST:PORT] [--db URL] [--workers N]`: the built-in server.

An HTTP/1.1 server (agent/collector/server.py: selector-read requests with head and body
deadlines, a pool of app threads, keep-alive; agents reuse their connection); with --workers N,
N forked processes accept on one socket (parsing and validation then use several cores). The
same app also runs under gunicorn or waitress (see agent/collector/__init__.py).
Exit codes: 0 stopped, 2 bad configuration or usage, 1 could not start.
"""
import argparse
import logging
import signal
import sys

from agent import __version__
from agent.collector.server import DRAIN_MAX, Server, make_server, server_options  # noqa: F401

log = logging.getLogger("modbus.collector")


def build_parser():
    p = argparse.ArgumentParser(prog="modbus-collector", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version="modbus-collector %s" % __version__)
    p.add_argument("-c", "--config", metavar="FILE", help="collector INI file (default: built-in, open, local)")
    p.add_argument("--listen", metavar="HOST:PORT", help="override [collector] listen")
    p.add_argument("--db", metavar="URL", help="override [collector] db (a file path, sqlite:///path or "
                   "postgresql://...)")
    p.add_argument("--open-writes", action="store_true", default=None,
                   help="override [collector] open_writes: beyond loopback, accept writes without tokens")
    p.add_argument("--open-reads", action="store_true", default=None,
                   help="override [collector] open_reads: beyond loopback, answer reads without read_token")
    p.add_argument("--log-level", default=None, help="override [collector] log_level")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="override [collector] workers: processes sharing the listening socket")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from agent.collector import make_app
    from agent.collector.config import ConfigError, check_access, load_config, parse_listen, redact

    try:
        cfg = load_config(args.config, listen=args.listen, db=args.db, log_level=args.log_level,
                          open_writes=args.open_writes, open_reads=args.open_reads)
        host, port = parse_listen(cfg.listen)
        warnings = check_access(cfg)
    except (ConfigError, ValueError) as e:
        print("modbus-collector: %s" % redact(e), file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for w in warnings:
        log.warning("%s", w)
    workers = args.workers or cfg.workers
    try:
        if workers > 1:
            server = Server((host, port), **server_options(cfg))  # accept() is non-blocking
            make_app(cfg, retention_days=0).close()  # migrate once, before forking; fail early
            app = None
        else:
            app = make_app(cfg)
            server = Server((host, port), app, **server_options(cfg))
    except Exception as e:
        log.error("cannot start: %s", redact(e))
        return 1

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    log.info("modbus-collector %s listening on http://%s:%d, storing in %s%s", __version__, host,
             server.server_address[1], redact(cfg.db),
             " (%d worker processes)" % workers if workers > 1 else "")
    if workers > 1:
        return _prefork(server, cfg, workers)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
        log.info("stopped")
    return 0


def _worker(server, cfg, k):
    """A forked worker: its own app and database connections, the parent's listening socket."""
    from agent.collector import make_app

    code = 0
    app = None
    try:
        app = make_app(cfg, retention_days=0 if k else None)  # retention runs in worker 0 only
        server.set_app(app)
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    except Exception:
        import traceback

        from agent.collector.config import redact

        log.error("worker %d failed:\n%s", k, redact(traceback.format_exc()).rstrip())
        code = 1
    finally:
        if app is not None:
            app.close()
    return code


def _prefork(server, cfg, workers):
    import os
    import time

    children = {}

    def spawn(k):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker(server, cfg, k)
            finally:
                os._exit(code)
        children[pid] = k

    try:
        for k in range(workers):
            spawn(k)
        while True:
            pid, status = os.wait()
            k = children.pop(pid, None)
            if k is not None:
                log.error("worker %d (pid %d) exited with status %d; starting a new one", k, pid, status)
                time.sleep(1.0)
                spawn(k)
    except KeyboardInterrupt:
        pass
    finally:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        server.server_close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
