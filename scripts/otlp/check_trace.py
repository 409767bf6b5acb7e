#!/usr/bin/env python3
"""Checks the spans scripts/otlp_receiver.py wrote (JSON lines) for one
booking's whole life in ONE trace:

    booking-service  CreateBooking (server)              the root
      └ booking-service  plan_follow_up (consumer)         the booking's follow-up job
          [└ booking-service  deliver_follow_up (consumer) a deliver job, if the
                                                           delivery was retried]
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

    # Walk up from memory-service's answered StoreMessage: a retried hop
    # leaves spans of its failed attempts too, but the one that answered
    # must lead back to this CreateBooking, link by link.
    answered = [
        s
        for s in trace
        if s["name"] == STORE_MESSAGE
        and s["kind"] == SERVER
        and s["service.name"] == "memory-service"
        and s["attributes"].get("rpc.grpc.status_code") == 0
    ]
    if not answered:
        raise Missing("no memory-service's StoreMessage server span that answered OK")
    by_id = {s["span_id"]: s for s in trace}

    def parent(span, what, parent_what, name, kind):
        up = by_id.get(span["parent_span_id"])
        if up is None:
            raise Missing(
                f"no {parent_what} span: {what}'s parent_span_id "
                f"{span['parent_span_id']!r} is not in the trace"
            )
        if (up["name"], up["kind"], up["service.name"]) != (name, kind, "booking-service"):
            raise Missing(
                f"{what}: parent is {up['service.name']} {up['name']} (kind {up['kind']}), "
                f"expected the {parent_what}: booking-service {name} (kind {kind})"
            )
        return up

    server = answered[0]
    client = parent(server, "StoreMessage server", "booking's StoreMessage client", STORE_MESSAGE, CLIENT)
    # The follow-up job delivers itself; a retried delivery runs in a
    # deliver job under it.
    caller = by_id.get(client["parent_span_id"])
    if caller is not None and caller["name"] == "deliver_follow_up":
        below = parent(client, "StoreMessage client", "deliver job", "deliver_follow_up", CONSUMER)
        plan = parent(below, "deliver job", "follow-up job", "plan_follow_up", CONSUMER)
    else:
        plan = parent(client, "StoreMessage client", "follow-up job", "plan_follow_up", CONSUMER)
    top = parent(plan, "follow-up job", "CreateBooking", CREATE_BOOKING, SERVER)
    if top is not root:
        raise Missing("the plan job hangs under another CreateBooking")

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
