#!/usr/bin/env python3
"""A maitre client in another language: a Python backend over plain gRPC.

It compiles the service contract (../../proto) into Python stubs at run time
with grpcio-tools, then walks the whole journey against a running stack,
checking every answer:

  health (grpcio-health-checking) -> StoreMessage x3 (negative emotions)
  -> idempotent retry -> GetConversation -> GetEmotionHistory
  -> ListConversations -> CreateSlot -> CreateBooking -> ListFollowUps until
  SENT -> ListMessages shows the follow-up once -> rich errors: a bad
  StoreMessage gives INVALID_ARGUMENT whose grpc-status-details-bin trailer
  decodes (grpcio-status) to a BadRequest naming the bad fields, and a full
  slot gives FAILED_PRECONDITION with ErrorInfo reason SLOT_FULL.

The stack must deliver follow-ups right after the event
(BOOKING_FOLLOWUP_DELAY=0s BOOKING_WORKER_POLL_INTERVAL=100ms scripts/dev-up.sh).

Exit status 0 when every check passed, 1 (with the failed check) otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.resources
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

HERE = pathlib.Path(__file__).resolve().parent
PROTOS = ("maitre/memory/v1/memory.proto", "maitre/booking/v1/booking.proto")


def step(text: str) -> None:
    print(f"-> {text}", flush=True)


def check(condition: bool, what: str) -> None:
    """A failed check stops the client with what was expected."""
    if not condition:
        raise AssertionError(what)
    print(f"    ok: {what}", flush=True)


# ---------------------------------------------------------------- stubs
def compile_stubs(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """python -m grpc_tools.protoc for our protos; google/protobuf/*.proto
    come from the copy grpcio-tools ships in grpc_tools/_proto."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    print("    $ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=proto_dir)


def load_stubs(out_dir: pathlib.Path):
    sys.path.insert(0, str(out_dir))
    names = (
        "maitre.memory.v1.memory_pb2",
        "maitre.memory.v1.memory_pb2_grpc",
        "maitre.booking.v1.booking_pb2",
        "maitre.booking.v1.booking_pb2_grpc",
    )
    return [importlib.import_module(n) for n in names]


# ---------------------------------------------------------------- helpers
def timestamp(seconds_from_now: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds_from_now)
    )
    return ts


def rich_error(err: grpc.RpcError):
    """The google.rpc.Status of a failed call, with its details unpacked:
    (status, [BadRequest...], [ErrorInfo...])."""
    status = rpc_status.from_call(err)
    if status is None:
        raise AssertionError(
            f"{err.code()} carries no grpc-status-details-bin trailer: {err.details()}"
        )
    bad_requests, infos = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            bad_requests.append(bad)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    return status, bad_requests, infos


# What a production backend would configure: UNAVAILABLE (e.g. "the database
# is unavailable; retry later") is retried with backoff by gRPC itself. Safe
# here because every write carries a request_id, so a retry is a replay.
RETRY_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "maitre.memory.v1.MemoryService"},
                {"service": "maitre.booking.v1.BookingService"},
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(RETRY_CONFIG)),
]


class Client:
    """Both services' stubs, every call with a deadline and the token."""

    def __init__(self, args, stubs):
        self.memory_pb, memory_grpc, self.booking_pb, booking_grpc = stubs
        self.metadata = (
            [("authorization", f"Bearer {args.token}")] if args.token else None
        )
        self.memory_channel = grpc.insecure_channel(args.memory_addr, options=CHANNEL_OPTIONS)
        self.booking_channel = grpc.insecure_channel(args.booking_addr, options=CHANNEL_OPTIONS)
        self.memory = memory_grpc.MemoryServiceStub(self.memory_channel)
        self.booking = booking_grpc.BookingServiceStub(self.booking_channel)
        self.health = {
            "memory": health_pb2_grpc.HealthStub(self.memory_channel),
            "booking": health_pb2_grpc.HealthStub(self.booking_channel),
        }

    def call(self, method, request):
        return method(request, timeout=10, metadata=self.metadata)

    def close(self):
        self.memory_channel.close()
        self.booking_channel.close()


# ---------------------------------------------------------------- journey
def check_health(c: Client) -> None:
    step("health: readiness of each service, and liveness")
    names = {
        "memory": "maitre.memory.v1.MemoryService",
        "booking": "maitre.booking.v1.BookingService",
    }
    serving = health_pb2.HealthCheckResponse.SERVING
    for which, stub in c.health.items():
        for service in ("", names[which], "liveness"):
            answer = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            check(answer.status == serving, f"{which}: health {service!r} is SERVING")
    try:
        c.health["memory"].Check(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5
        )
        raise AssertionError("health of an unknown service answered")
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.NOT_FOUND, "unknown health name: NOT_FOUND")


def store_conversation(c: Client, user: str) -> str:
    m = c.memory_pb
    conversation = str(uuid.uuid4())
    step(f"StoreMessage x3 with negative emotions into conversation {conversation}")
    for i, (score, label) in enumerate([(-0.2, "sadness"), (-0.5, "anger"), (-0.8, "anger")]):
        request = m.StoreMessageRequest(
            conversation_id=conversation,
            user_id=user,
            channel="python",
            role=m.ROLE_USER,
            content=f"message {i + 1}: the soup was cold",
            emotion=m.Emotion(score=score, label=label, scores={label: 0.9}),
            metadata={"client": "examples/python"},
            request_id=f"{user}-msg-{i}",
        )
        answer = c.call(c.memory.StoreMessage, request)
        check(answer.message.sequence == i + 1, f"message {i + 1} has sequence {i + 1}")
        check(answer.conversation_created == (i == 0), f"created only by message 1 ({i + 1})")
        check(answer.conversation_message_count == i + 1, f"count {i + 1} after message {i + 1}")
        check(not answer.replayed, "not a replay")
        check(answer.message.emotion.label == label, f"label {label} kept")
        check(answer.message.HasField("create_time"), "create_time set")

    step("the same request_id again is a replay that writes nothing")
    again = c.call(c.memory.StoreMessage, request)
    check(again.replayed, "replayed")
    check(again.message.message_id == answer.message.message_id, "same message id")
    check(again.conversation_message_count == 3, "still 3 messages")
    return conversation


def check_conversation(c: Client, user: str, conversation: str) -> None:
    m = c.memory_pb
    step("GetConversation: 3 messages, declining emotion")
    conv = c.call(
        c.memory.GetConversation, m.GetConversationRequest(conversation_id=conversation)
    ).conversation
    stats = conv.emotion_stats
    check(conv.message_count == 3, "message_count 3")
    check(conv.user_id == user and conv.channel == "python", "user and channel kept")
    check(conv.active, "active")
    check(stats.scored_message_count == 3, "3 scored messages")
    check(abs(stats.average_score - (-0.5)) < 1e-9, "average score -0.5")
    check(abs(stats.last_score - (-0.8)) < 1e-9, "last score -0.8")
    check(dict(stats.label_counts) == {"sadness": 1, "anger": 2}, "label counts")
    check(stats.trend == m.EMOTION_TREND_DECLINING, "trend DECLINING")

    step("GetEmotionHistory: oldest first")
    points = c.call(
        c.memory.GetEmotionHistory,
        m.GetEmotionHistoryRequest(conversation_id=conversation, limit=10),
    ).points
    check([p.score for p in points] == [-0.2, -0.5, -0.8], "scores in order")
    check([p.sequence for p in points] == [1, 2, 3], "sequences 1..3")

    step("ListConversations of the user")
    listed = c.call(
        c.memory.ListConversations, m.ListConversationsRequest(user_id=user, page_size=10)
    )
    check(
        [x.conversation_id for x in listed.conversations] == [conversation],
        "exactly this conversation",
    )
    check(listed.next_page_token == "", "no further page")


def book_and_follow_up(c: Client, args, user: str, conversation: str) -> None:
    b, m = c.booking_pb, c.memory_pb
    step(f"CreateSlot starting in {args.slot_start_in} s, lasting 1 s")
    slot = c.call(
        c.booking.CreateSlot,
        b.CreateSlotRequest(
            start_time=timestamp(args.slot_start_in),
            end_time=timestamp(args.slot_start_in + 1),
            capacity=4,
            label="Python table",
            request_id=f"{user}-slot",
        ),
    ).slot
    check(slot.capacity == 4 and slot.available_seats == 4, "4 free seats")

    step("CreateBooking for the conversation")
    request = b.CreateBookingRequest(
        customer_id=user,
        customer_name="Py Thon",
        conversation_id=conversation,
        slot_id=slot.slot_id,
        party_size=2,
        deposit=b.Money(currency_code="EUR", amount_minor=2500),
        request_id=f"{user}-booking",
    )
    answer = c.call(c.booking.CreateBooking, request)
    booking = answer.booking
    check(not answer.replayed, "a new booking")
    check(booking.state == b.BOOKING_STATE_CONFIRMED, "CONFIRMED")
    check(booking.deposit.state == b.PAYMENT_STATE_PENDING, "deposit PENDING")
    check(booking.deposit.amount.amount_minor == 2500, "deposit 25.00")
    check(booking.conversation_id == conversation, "linked to the conversation")
    again = c.call(c.booking.CreateBooking, request)
    check(again.replayed and again.booking.booking_id == booking.booking_id, "retry replays")
    got = c.call(c.booking.GetBooking, b.GetBookingRequest(booking_id=booking.booking_id))
    check(got.booking == booking, "GetBooking returns the same booking")

    step(f"ListFollowUps until SENT (at most {args.followup_wait} s)")
    deadline = time.monotonic() + args.followup_wait
    while True:
        follow_ups = c.call(
            c.booking.ListFollowUps, b.ListFollowUpsRequest(booking_id=booking.booking_id)
        ).follow_ups
        state = follow_ups[0].state if follow_ups else None
        if state == b.FOLLOW_UP_STATE_SENT:
            break
        if state in (b.FOLLOW_UP_STATE_FAILED, b.FOLLOW_UP_STATE_CANCELLED):
            raise AssertionError(f"follow-up ended {b.FollowUpState.Name(state)}: {follow_ups[0]}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no SENT follow-up after {args.followup_wait} s ({follow_ups}); does "
                "booking-service run with BOOKING_FOLLOWUP_DELAY=0s?"
            )
        time.sleep(0.25)
    follow_up = follow_ups[0]
    check(len(follow_ups) == 1, "one follow-up")
    check(follow_up.template_key == "service_recovery", "service_recovery for a sad customer")
    check(follow_up.conversation_id == conversation, "for the conversation")
    by_conversation = c.call(
        c.booking.ListFollowUps, b.ListFollowUpsRequest(conversation_id=conversation)
    ).follow_ups
    check([f.follow_up_id for f in by_conversation] == [follow_up.follow_up_id], "listed by conversation too")

    step("ListMessages: the follow-up is there exactly once")
    messages = c.call(
        c.memory.ListMessages, m.ListMessagesRequest(conversation_id=conversation, page_size=50)
    ).messages
    assistant = [x for x in messages if x.role == m.ROLE_ASSISTANT]
    check(len(messages) == 4, "4 messages")
    check(len(assistant) == 1, "one assistant message")
    check(assistant[0].message_id == follow_up.message_id, "it is the follow-up's message")
    check(assistant[0].content == follow_up.rendered_text, "with the rendered text")
    check(assistant[0].sequence == 4, "as message 4")


def check_rich_errors(c: Client, user: str) -> None:
    b, m = c.booking_pb, c.memory_pb
    step("a bad StoreMessage: INVALID_ARGUMENT with a BadRequest in the trailers")
    try:
        c.call(
            c.memory.StoreMessage,
            m.StoreMessageRequest(conversation_id="not-a-uuid", user_id="", content="x"),
        )
        raise AssertionError("a bad StoreMessage succeeded")
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        status, bad_requests, infos = rich_error(err)
        check(status.code == code_pb2.INVALID_ARGUMENT, "google.rpc.Status code 3")
        check(len(bad_requests) == 1, "one BadRequest detail")
        fields = [v.field for v in bad_requests[0].field_violations]
        print(f"    field violations: {fields}")
        check(fields == ["conversation_id", "user_id", "role"], "names every bad field")
        check(all(v.description for v in bad_requests[0].field_violations), "each described")
        check(
            [(i.reason, i.domain) for i in infos] == [("INVALID_ARGUMENT", "memory.maitre")],
            "ErrorInfo INVALID_ARGUMENT in memory.maitre",
        )

    step("a full slot: FAILED_PRECONDITION with ErrorInfo SLOT_FULL")
    slot = c.call(
        c.booking.CreateSlot,
        b.CreateSlotRequest(
            start_time=timestamp(3600),
            end_time=timestamp(7200),
            capacity=1,
            label="tiny",
            request_id=f"{user}-tiny-slot",
        ),
    ).slot
    try:
        c.call(
            c.booking.CreateBooking,
            b.CreateBookingRequest(
                customer_id=user,
                customer_name="Py Thon",
                slot_id=slot.slot_id,
                party_size=2,
                deposit=b.Money(currency_code="EUR", amount_minor=0),
                request_id=f"{user}-too-many",
            ),
        )
        raise AssertionError("booking 2 seats of 1 succeeded")
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
        _, _, infos = rich_error(err)
        check([i.reason for i in infos] == ["SLOT_FULL"], "reason SLOT_FULL")
        check(infos[0].metadata.get("available_seats") == "1", "available_seats 1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-addr", default=os.environ.get("MEMORY_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--booking-addr", default=os.environ.get("BOOKING_ADDR", "127.0.0.1:50052"))
    parser.add_argument("--proto-dir", type=pathlib.Path, default=HERE.parent.parent / "proto")
    parser.add_argument("--token", default=os.environ.get("AUTH_TOKEN"), help="bearer token, if required")
    parser.add_argument("--slot-start-in", type=float, default=2.0)
    parser.add_argument("--followup-wait", type=float, default=30.0)
    args = parser.parse_args()

    out = pathlib.Path(tempfile.mkdtemp(prefix="maitre-stubs-"))
    try:
        step(f"compiling {args.proto_dir} into Python stubs")
        compile_stubs(args.proto_dir.resolve(), out)
        client = Client(args, load_stubs(out))
        print(f"    memory-service {args.memory_addr}, booking-service {args.booking_addr}")
        user = f"python-{uuid.uuid4().hex[:8]}"
        try:
            check_health(client)
            conversation = store_conversation(client, user)
            check_conversation(client, user, conversation)
            book_and_follow_up(client, args, user, conversation)
            check_rich_errors(client, user)
        finally:
            client.close()
    except AssertionError as failure:
        print(f"client.py: FAILED: {failure}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"client.py: FAILED: unexpected {err.code()}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("client.py: PASSED: the Python client walked the whole journey")
    return 0


if __name__ == "__main__":
    sys.exit(main())
