"""What the loop asks of a service: something served in the gaps between polls that reads no
spool (agent.gateway's Modbus TCP server is the first one).

The loop (agent.loop) sleeps in select() on its signal wake-up pipe plus every service's
`fds()` (and `write_fds()`), and calls `serve(until)` when one of them is ready; it also calls
`serve` once after every poll (when the bus is saturated and the next poll is already due, with
a budget of `agent.loop.SERVICE_SLICE`), so a request waits at most one poll's duration.

The rules every service keeps, because the bus comes first:
  - `serve(until)` handles only I/O that is ready (non-blocking sockets), and starts no new
    piece of work at or after `until` (time.monotonic()); what is left stays readable in the
    kernel and wakes the loop's next select;
  - never raise into the loop for a peer's fault: a bad client is the service's to drop.
"""


class Service:
    """The interface. Subclasses set `name` and implement `fds` and `serve`."""

    name = None

    def fds(self):
        """Sockets (or fds) whose readability should wake the loop's sleep."""
        return ()

    def write_fds(self):
        """Sockets waiting to write (a client's unsent answers)."""
        return ()

    def serve(self, until):
        """Handle ready I/O until `until` at most (time.monotonic())."""
        raise NotImplementedError

    def watch(self, states):
        """The loop's device states (agent.polling.DeviceState), at start and after a reload."""

    def update(self, cfg):
        """A reload whose change the service can take in place (agent.loop.Loop.reload)."""

    def state(self):
        """A dict for the status file."""
        return {}

    def close(self):
        """Release sockets (shutdown, or a reload that replaces the service)."""
