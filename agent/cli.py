"""`modbus-agent` command line: check, poll, probe, write, scan, run, status.

Each subcommand's work lives in the module that owns it; this file only parses arguments.
Exit codes: 0 ok, 1 a device or run failed, 2 bad configuration or usage.
"""
import argparse
import sys

from agent import __version__


def build_parser():
    p = argparse.ArgumentParser(prog="modbus-agent", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"modbus-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("-c", "--config", required=True, metavar="FILE", help="the agent's INI file")
        return sp

    add("check", "validate the config and print the polling plan")
    sp = add("poll", "read every device once and print its values")
    sp.add_argument("--device", metavar="NAME", help="only this device")
    sp.add_argument("--json", action="store_true", help="one JSON record per device, as spooled")
    sp = add("probe", "guess type, byte order and address base of a register from an expected range")
    sp.add_argument("--device", metavar="NAME", required=True)
    sp.add_argument("--address", metavar="A", required=True)
    sp.add_argument("--table", default="holding", choices=["holding", "input"])
    sp.add_argument("--expect", metavar="LOW..HIGH", required=True)
    sp = add("write", "write one value to a point (or raw registers/coils), confirm, read back")
    sp.add_argument("device", metavar="DEVICE", help="a [device:NAME] with writable = yes")
    sp.add_argument("what", nargs="+", metavar="POINT VALUE | TABLE ADDRESS VALUE...",
                    help="a point and its value, or with --raw a table, protocol address and values")
    sp.add_argument("--raw", action="store_true", help="write raw registers or coils: TABLE ADDRESS VALUE...")
    sp.add_argument("--yes", action="store_true", help="send without asking")
    sp = add("scan", "find the devices on a connection: unit ids, baud rates, parities")
    sp.add_argument("--connection", metavar="NAME", required=True, help="a [connection:NAME] of the file")
    sp.add_argument("--units", metavar="RANGES", help="unit ids to ask, e.g. 1-247 (default) or 1,3,10-20")
    sp.add_argument("--bauds", metavar="LIST", help="serial only: baud rates to try, e.g. 9600,19200")
    sp.add_argument("--parities", metavar="LIST", help="serial only: parities to try, e.g. N,E")
    sp.add_argument("--timeout", metavar="DURATION", help="answer timeout (default 200ms, or the connection's if shorter)")
    sp.add_argument("--pause", metavar="DURATION", help="silence between requests (default 50ms, or the connection's if longer)")
    sp = add("run", "poll, spool and upload until stopped (the main job)")
    sp.add_argument("--log-level", default=None, help="override [agent] log_level")
    sp = add("status", "print device health, spool backlog and upload state of a running agent")
    sp.add_argument("--json", action="store_true", help="print the status file as JSON")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("check", "poll", "probe"):
        from agent import commands

        handler = getattr(commands, f"cmd_{args.command}")
    elif args.command == "write":
        from agent.write import cmd_write as handler
    elif args.command == "scan":
        from agent.scan import cmd_scan as handler
    elif args.command == "run":
        from agent.loop import cmd_run as handler
    else:
        from agent.status import cmd_status as handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `modbus-agent poll | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
