"""Tests of scripts/otlp/check_trace.py, the assertion of scripts/trace-check.sh:
python3 -m unittest discover -s scripts/tests -t scripts"""
import copy
import unittest

from otlp.check_trace import CREATE_BOOKING, STORE_MESSAGE, Missing, check

BOOKING = "01a237c7-9b36-7113-81f1-85d2d2777c6f"
TRACE = "a5c87737d5a290b64db760453f61eaee"


def span(span_id, parent, name, kind, service, **attributes):
    return {
        "trace_id": TRACE,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": name,
        "kind": kind,
        "service.name": service,
        "attributes": attributes,
    }


def booking_trace():
    """One booking's life as the services export it (ids shortened): the
    follow-up job delivers itself."""
    return [
        span("01", "", CREATE_BOOKING, 2, "booking-service", **{"rpc.grpc.status_code": 0}),
        span("02", "01", "bookings::CREATE", 3, "booking-service", **{"db.system": "postgresql"}),
        span("03", "01", "plan_follow_up", 5, "booking-service", **{"maitre.booking_id": BOOKING}),
        span("05", "03", STORE_MESSAGE, 3, "booking-service", **{"rpc.grpc.status_code": 0}),
        span("06", "05", STORE_MESSAGE, 2, "memory-service", **{"rpc.grpc.status_code": 0}),
        span("07", "06", "messages::STORE_MESSAGE", 3, "memory-service", **{"db.system": "postgresql"}),
        # Another trace entirely: ignored.
        dict(span("99", "", "maitre.booking.v1.BookingService/ListFollowUps", 2, "booking-service"),
             trace_id="ffffffffffffffffffffffffffffffff"),
    ]


def retried_trace():
    """The same booking whose first delivery failed: a deliver job, under
    the follow-up job, stored it."""
    spans = booking_trace()
    spans.insert(3, span("04", "03", "deliver_follow_up", 5, "booking-service"))
    spans[4]["parent_span_id"] = "04"
    return spans


class CheckTraceTest(unittest.TestCase):
    def test_a_complete_trace_passes(self):
        trace_id, count, sql = check(booking_trace(), BOOKING)
        self.assertEqual(trace_id, TRACE)
        self.assertEqual(count, 6)
        self.assertEqual(sql, ["bookings::CREATE", "messages::STORE_MESSAGE"])

    def test_a_retried_delivery_passes(self):
        trace_id, count, _ = check(retried_trace(), BOOKING)
        self.assertEqual((trace_id, count), (TRACE, 7))

    def broken(self, change, message, trace=booking_trace):
        spans = copy.deepcopy(trace())
        change(spans)
        with self.assertRaisesRegex(Missing, message):
            check(spans, BOOKING)

    def test_a_missing_hop_fails(self):
        self.broken(lambda s: s.pop(4), "memory-service's StoreMessage server")
        self.broken(lambda s: s.pop(3), "follow-up job", retried_trace)

    def test_a_wrong_or_dangling_parent_fails(self):
        self.broken(lambda s: s[3].update(parent_span_id=""), "StoreMessage client")
        self.broken(lambda s: s[3].update(parent_span_id="01"), "follow-up job")
        self.broken(lambda s: s[3].update(parent_span_id="01"), "deliver job", retried_trace)
        self.broken(lambda s: s[1].update(parent_span_id="42"), "not in the trace")

    def test_a_trace_split_in_two_fails(self):
        # The job started a new trace instead of continuing the booking's.
        def split(spans):
            for s in spans[2:6]:
                s["trace_id"] = "0" * 31 + "1"
        self.broken(split, "0 CreateBooking server spans for the booking")

    def test_no_sql_span_fails(self):
        def no_sql(spans):
            for s in spans:
                s["attributes"].pop("db.system", None)
        self.broken(no_sql, "no SQL span")


if __name__ == "__main__":
    unittest.main()
