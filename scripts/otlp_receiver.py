#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace receiver for tests: implements
opentelemetry.proto.collector.trace.v1.TraceService/Export and appends every
span it receives to a file as one JSON object per line:

    {"trace_id", "span_id", "parent_span_id", "name", "kind", "service.name",
     "attributes": {...}}

Ids are lower-case hex ("" for no parent). Usage:

    otlp_receiver.py --port-file PATH --out SPANS.jsonl [--port 0]

It binds 127.0.0.1 (port 0: a free one) and writes the port it got to
--port-file once it serves, so the caller never races for a port. Stops on
SIGTERM/SIGINT.
"""

import argparse
import json
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def any_value(value):
    """An OTLP AnyValue as plain JSON."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(pairs):
    return {kv.key: any_value(kv.value) for kv in pairs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(
                        json.dumps(
                            {
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                                "kind": span.kind,
                                "service.name": resource.get("service.name"),
                                "attributes": attributes(span.attributes),
                            },
                            sort_keys=True,
                        )
                    )
        with self.lock, open(self.out, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON lines file to append spans to")
    parser.add_argument("--port-file", required=True, help="where to write the bound port")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free one)")
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(args.out), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        print(f"otlp_receiver: cannot bind 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    server.start()
    with open(args.port_file + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{port}\n")
    # Renamed into place: a reader never sees a half-written port.
    os.replace(args.port_file + ".tmp", args.port_file)
    print(f"otlp_receiver: listening on 127.0.0.1:{port}, spans to {args.out}", file=sys.stderr)

    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
