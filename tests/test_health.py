"""agent.health: counters split by who detected the failure, JSON-ready snapshot."""
import json

from agent.health import Health
from agent.modbus.errors import CRCError, DeviceError, FrameError, ModbusTimeout
from agent.record import utc_timestamp


def test_counters_by_kind_and_exception_code():
    h = Health("meter1", 1)
    h.ok(1_800_000_000.0, 0.012)
    h.failed(ModbusTimeout("no answer", unit=1, function=3, address=0, count=2), 1_800_000_001.0)
    h.failed(CRCError("bad crc", got=b"\x01\x03"), 1_800_000_002.0)
    h.failed(FrameError("short"), 1_800_000_003.0)
    h.failed(DeviceError(2, unit=1, function=3, address=9999, count=1), 1_800_000_004.0)
    h.failed(DeviceError(2), 1_800_000_005.0)
    h.failed(DeviceError(6), 1_800_000_006.0)
    h.failed(ValueError("decoder bug"), 1_800_000_007.0)
    snap = h.snapshot(utc_timestamp)
    assert snap["polls_ok"] == 1 and snap["polls_failed"] == 7
    assert snap["consecutive_failures"] == 7
    assert (snap["timeouts"], snap["crc_errors"], snap["frame_errors"], snap["other_errors"]) == (1, 1, 1, 1)
    assert snap["exceptions"] == {"2": 2, "6": 1}
    assert snap["last_success"] == "2027-01-15T08:00:00.000Z"
    assert snap["last_error"] == "decoder bug"
    json.dumps(snap)  # goes into records and the status file as is


def test_success_resets_consecutive_failures_and_names_the_error_location():
    h = Health("plc", 7)
    h.failed(ModbusTimeout("no answer", unit=7, function=4, address=100, count=10), 5.0)
    assert "unit 7 fc 04 address 100 count 10" in h.last_error
    h.ok(6.0)
    assert h.consecutive_failures == 0 and h.polls_failed == 1 and h.last_success == 6.0
