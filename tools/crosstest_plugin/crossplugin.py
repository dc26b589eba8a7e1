"""pytest plugin for tests run under qemu-user (tools/cross-test): Hypothesis' default 200 ms
deadline per example is an x86 figure, and emulation is 10-50x slower, so the deadline is off.
Examples, their number and every assertion stay as the tests wrote them."""
from hypothesis import settings

settings.register_profile("cross", deadline=None)
settings.load_profile("cross")
