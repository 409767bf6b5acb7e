#!/usr/bin/env python3
"""Checks the spans scripts/otlp_receiver.py wrote (JSON lines) for one
booking's whole life in ONE trace:

    booking-service  CreateBooking (server)              the root
      └ booking-service  plan_follow_up (consumer)         the plan job
          └ booking-service  deliver_follow_up (consumer)  the deliver job
              └ booking-service  MemoryService/StoreMessage (client)
                  └ memory-service  MemoryService/StoreMessage (server)
    and at least one SQL span (db.system = postgresql) in the trace,

with every parent_span_id naming a span of the trace (only the root has
none). Usage: check_trace.py SPANS.jsonl [BOOKING_ID]. Exit 0 when all
holds, else 1 with the first thing missing (the caller polls until the
spans have arrived).
"""

import json
import sys

CREATE_BOOKING = "maitre.booking.v1.BookingService/CreateBooking"
STORE_MESSAGE = "maitre.memory.v1.MemoryService/StoreMessage"
SERVER, CONSUMER, CLIENT = 2, 5, 3


class Missing(Exception):
    pass


def load(path):
    spans = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    spans.append(json.loads(line))
    except FileNotFoundError:
        pass
    return spans


def one(spans, what, **match):
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    if not found:
        raise Missing(f"no {what} span ({match})")
    if len(found) > 1:
        raise Missing(f"{len(found)} {what} spans, expected one ({match})")
    return found[0]


def child_of(parent, child, what):
    if child["parent_span_id"] != parent["span_id"]:
        raise Missing(
            f"{what}: parent_span_id {child['parent_span_id']!r}, "
            f"expected {parent['span_id']!r} ({parent['name']})"
        )


def check(spans, booking_id=None):
    roots = [
        s
        for s in spans
        if s["name"] == CREATE_BOOKING and s["service.name"] == "booking-service"
    ]
    if booking_id is not None:
        # The booking's trace is the one whose plan job names it.
        traces = {
            s["trace_id"]
            for s in spans
            if s["attributes"].get("maitre.booking_id") == booking_id
        }
        roots = [s for s in roots if s["trace_id"] in traces]
    if len(roots) != 1:
        raise Missing(f"{len(roots)} CreateBooking server spans for the booking, expected one")
    root = roots[0]
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    if root["kind"] != SERVER:
        raise Missing(f"CreateBooking span kind {root['kind']}, expected SERVER")

    plan = one(trace, "plan job", name="plan_follow_up", **{"service.name": "booking-service"})
    deliver = one(trace, "deliver job", name="deliver_follow_up", **{"service.name": "booking-service"})
    client = one(trace, "booking's StoreMessage client", name=STORE_MESSAGE, kind=CLIENT,
                 **{"service.name": "booking-service"})
    server = one(trace, "memory-service's StoreMessage server", name=STORE_MESSAGE, kind=SERVER,
                 **{"service.name": "memory-service"})
    child_of(root, plan, "plan job")
    child_of(plan, deliver, "deliver job")
    child_of(deliver, client, "StoreMessage client")
    child_of(client, server, "StoreMessage server")
    for span, kind in ((plan, CONSUMER), (deliver, CONSUMER)):
        if span["kind"] != kind:
            raise Missing(f"{span['name']} kind {span['kind']}, expected CONSUMER")
    if server["attributes"].get("rpc.grpc.status_code") != 0:
        raise Missing(f"StoreMessage answered {server['attributes'].get('rpc.grpc.status_code')}")

    sql = [s for s in trace if s["attributes"].get("db.system") == "postgresql"]
    if not sql:
        raise Missing("no SQL span in the trace")
    for service in ("booking-service", "memory-service"):
        if not any(s["service.name"] == service for s in sql):
            raise Missing(f"no SQL span of {service} in the trace")

    ids = {s["span_id"] for s in trace}
    if len(ids) != len(trace):
        raise Missing("span ids repeat within the trace")
    for span in trace:
        parent = span["parent_span_id"]
        if span is root:
            if parent:
                raise Missing(f"the root has a parent {parent}")
        elif parent not in ids:
            raise Missing(f"{span['service.name']} {span['name']}: parent {parent!r} not in the trace")
    return root["trace_id"], len(trace), sorted({s["name"] for s in sql})


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    spans = load(sys.argv[1])
    try:
        trace_id, count, sql = check(spans, sys.argv[2] if len(sys.argv) == 3 else None)
    except Missing as missing:
        print(f"check_trace: {missing} ({len(spans)} spans received)", file=sys.stderr)
        return 1
    print(f"check_trace: trace {trace_id}: {count} spans, all linked; SQL spans: {', '.join(sql)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
