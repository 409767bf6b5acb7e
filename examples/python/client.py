#!/usr/bin/env python3
"""A maitre client in another language: a Python backend over plain gRPC.

It compiles the service contract (../../proto) into Python stubs at run time
with grpcio-tools, then walks the whole journey against a running stack,
checking every answer:

  health (grpcio-health-checking) -> StoreMessage x3 (negative emotions)
  -> idempotent retry -> GetConversation -> GetEmotionHistory
  -> ListConversations -> CreateSlot -> CreateBooking -> ListFollowUps until
  SENT -> ListMessages shows the follow-up once -> an assistant turn loop,
  3 turns of: GetContext (newest messages within a token budget, oldest
  first, with the conversation and its state) -> a stand-in "model" (a
  deterministic function, no language model) -> StoreMessage x2 (the user's
  message, the assistant's reply with its output tokens) ->
  UpdateConversationState (a merge patch on the version GetContext read;
  ABORTED -> read again, redo the change, retry, at most 3 attempts), the
  state's version going up by one a turn and its "turns" counter counting
  them -> GetContext with a budget of exactly the newest reply's tokens (that
  reply alone) and of 1 token (no message, truncated) -> a stale
  expected_version gives ABORTED with ErrorInfo reason STATE_VERSION_MISMATCH
  and metadata current_version, writing nothing -> another writer comes
  first: the retry loop reads again and redoes the change on top of the
  other write -> rich errors: a bad StoreMessage gives INVALID_ARGUMENT whose
  grpc-status-details-bin trailer decodes (grpcio-status) to a BadRequest
  naming the bad fields, and a full slot gives FAILED_PRECONDITION with
  ErrorInfo reason SLOT_FULL -> the change feed, as a channel gateway
  follows it: WatchMessages from the cursor saved before the first message
  (the opening heartbeat's), every message of the conversation delivered once
  and in order, with a disconnect after the second and a resume from the last
  cursor handled; then one more message, and the loop resumes from its cursor
  with just that one -> the booking lifecycle of a second customer: HoldSeats
  (a second hold finds the slot full) -> ConfirmHold (retried: a replay) ->
  RecordPayment, as a payment provider's webhook delivers it (twice: a
  replay) -> MoveBooking to a later slot -> ListFollowUps until the reminder
  (worded with the new slot) and the follow-up are SENT -> on a slot an hour
  ahead, a paid booking cancelled leaves the deposit REFUND_PENDING, and a
  released hold frees its seats.

The stack must deliver follow-ups right after the event and reminders a few
seconds before it (BOOKING_FOLLOWUP_DELAY=0s BOOKING_REMINDER_LEAD=5s
BOOKING_WORKER_POLL_INTERVAL=100ms scripts/dev-up.sh).

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
# here because every write carries a request_id, so a retry is a replay; a
# state write (UpdateConversationState) has none but is a test-and-set: a
# retry of one that did land is refused with ABORTED, and the turn loop's
# change recognises its own earlier write (see update_state).
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


def book_and_follow_up(c: Client, args, user: str, conversation: str) -> str:
    """Books a table for the conversation; returns the follow-up's message id
    (the conversation's newest message)."""
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
        # The post-event follow-up (a booking this close to its event gets no reminder).
        follow_ups = [f for f in follow_ups if f.trigger == "post_event"]
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
    return follow_up.message_id


# ---------------------------------------------------------------- turn loop
TURN_TOKEN_BUDGET = 2000  # fits this whole conversation (under 1000 tokens)
STATE_WRITE_ATTEMPTS = 3  # a small, bounded retry on ABORTED
# The user's side of the turns: what they type, and the emotion the backend's
# emotion detector (made up here) scored it with.
USER_TURNS = (
    ("Thanks for writing back. Could I book a table for Friday instead?", 0.1, "hope"),
    ("Do you have vegetarian dishes on the menu?", 0.3, "curiosity"),
    ("Perfect, see you on Friday!", 0.7, "joy"),
)


def stand_in_model(m, context, user_text: str):
    """A STAND-IN for the language model, NOT a model: a deterministic
    function of the context (GetContextResponse) and the user's new message,
    so that every answer can be checked. A real backend would send
    context.messages (oldest first) and user_text to its model here.
    Returns (reply, intent, output_tokens)."""
    text = user_text.lower()
    if "book" in text:
        intent, answer = "book_table", "Friday works: shall I move your booking?"
    elif "menu" in text:
        intent, answer = "ask_menu", "Yes, a third of our menu is vegetarian."
    elif "see you" in text or "bye" in text:
        intent, answer = "goodbye", "See you on Friday!"
    else:
        intent, answer = "chat", "Tell me more."
    state = json.loads(context.state.state_json)
    trend = m.EmotionTrend.Name(context.conversation.emotion_stats.trend)
    reply = (
        f"(stand-in model, turn {state.get('turns', 0) + 1}) I read "
        f"{len(context.messages)} messages ({context.token_count} tokens), mood "
        f"{trend.removeprefix('EMOTION_TREND_').lower()}. {answer}"
    )
    return reply, intent, len(reply.split())  # "tokens": its words


def get_state(c: Client, conversation: str):
    m = c.memory_pb
    return c.call(
        c.memory.GetConversationState,
        m.GetConversationStateRequest(conversation_id=conversation),
    ).state


def update_state(c: Client, conversation: str, read, change):
    """Writes change(state) as an RFC 7396 merge patch on the version `read`
    (a ConversationState) came with. When another writer came first (ABORTED,
    STATE_VERSION_MISMATCH): reads again, redoes the change on what it read
    and retries, at most STATE_WRITE_ATTEMPTS times. `change` returns None
    when the state already holds the change (e.g. our own earlier write that
    landed although its answer was lost). Returns (state, attempts)."""
    m = c.memory_pb
    for attempt in range(1, STATE_WRITE_ATTEMPTS + 1):
        patch = change(json.loads(read.state_json))
        if patch is None:
            return read, attempt
        try:
            answer = c.call(
                c.memory.UpdateConversationState,
                m.UpdateConversationStateRequest(
                    conversation_id=conversation,
                    expected_version=read.version,
                    merge_patch_json=json.dumps(patch),
                ),
            )
            return answer.state, attempt
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ABORTED:
                raise
            _, _, infos = rich_error(err)
            check(
                [i.reason for i in infos] == ["STATE_VERSION_MISMATCH"],
                f"attempt {attempt}: ABORTED, STATE_VERSION_MISMATCH",
            )
            print(
                f"    version {read.version} is stale (now "
                f"{infos[0].metadata.get('current_version')}): reading again"
            )
            read = get_state(c, conversation)
    raise AssertionError(f"state write still contended after {STATE_WRITE_ATTEMPTS} attempts")


def check_context(m, context, conversation: str, newest_id: str, budget: int) -> None:
    """What every GetContext answer must be: a contiguous run of the newest
    messages, oldest first, within the budget."""
    messages = context.messages
    sequences = [x.sequence for x in messages]
    count = context.conversation.message_count
    check(context.conversation.conversation_id == conversation, "the conversation")
    check(context.state.conversation_id == conversation, "its state")
    check(context.token_count <= budget, f"{context.token_count} tokens within {budget}")
    if messages:
        first = sequences[0]
        check(sequences == list(range(first, first + len(messages))), "oldest first, no gap")
        check(messages[-1].message_id == newest_id, "the newest stored message last")
        check(sequences[-1] == count, f"up to message {count}, the newest")
        check(all(x.conversation_id == conversation for x in messages), "all of this conversation")
        check(context.truncated == (first > 1), "truncated exactly when older messages exist")
    else:
        check(context.token_count == 0, "no message: 0 tokens")
        check(context.truncated == (count > 0), "no message: truncated")


def turn_loop(c: Client, user: str, conversation: str, newest_id: str):
    """The assistant's turns; returns the newest reply (a StoreMessageResponse)."""
    m = c.memory_pb
    expected_state = {}  # what the state must hold after the previous turn
    for turn, (user_text, score, label) in enumerate(USER_TURNS, start=1):
        step(
            f"turn {turn}: GetContext -> stand-in model -> StoreMessage x2 "
            "-> UpdateConversationState"
        )
        context = c.call(
            c.memory.GetContext,
            m.GetContextRequest(conversation_id=conversation, token_budget=TURN_TOKEN_BUDGET),
        )
        count = context.conversation.message_count
        print(
            f"    {len(context.messages)} of {count} messages, {context.token_count} "
            f"tokens, state version {context.state.version}: {context.state.state_json}"
        )
        check_context(m, context, conversation, newest_id, TURN_TOKEN_BUDGET)
        check(count == 4 + 2 * (turn - 1), f"{count} messages: 4 + 2 per turn")
        check(len(context.messages) == count and not context.truncated, "all fit the budget")
        check(context.state.version == turn - 1, f"state version {turn - 1}")
        check(json.loads(context.state.state_json) == expected_state, "the state written last turn")
        if turn == 1:
            check(context.state.state_json.strip() == "{}", 'never written: "{}"')
            check(not context.state.HasField("update_time"), "never written: no update_time")

        reply, intent, output_tokens = stand_in_model(m, context, user_text)
        print(f"    user: {user_text}\n    assistant ({intent}, {output_tokens} tokens): {reply}")
        said = c.call(
            c.memory.StoreMessage,
            m.StoreMessageRequest(
                conversation_id=conversation,
                user_id=user,
                channel="python",
                role=m.ROLE_USER,
                content=user_text,
                emotion=m.Emotion(score=score, label=label),
                request_id=f"{user}-turn-{turn}-user",
            ),
        )
        answer = c.call(
            c.memory.StoreMessage,
            m.StoreMessageRequest(
                conversation_id=conversation,
                user_id=user,
                channel="python",
                role=m.ROLE_ASSISTANT,
                content=reply,
                metadata={"model": "stand-in", "intent": intent},
                token_usage=m.TokenUsage(output_tokens=output_tokens),
                request_id=f"{user}-turn-{turn}-assistant",
            ),
        )
        check(said.message.sequence == count + 1, f"user message {count + 1}")
        check(answer.message.sequence == count + 2, f"assistant reply {count + 2}")
        check(answer.message.token_usage.output_tokens == output_tokens, "output tokens kept")
        check(not said.replayed and not answer.replayed, "both new")
        newest_id = answer.message.message_id

        def change(state, intent=intent, reply_id=newest_id):
            if state.get("last_reply_id") == reply_id:
                return None  # our write landed already
            return {"turns": state.get("turns", 0) + 1, "last_intent": intent, "last_reply_id": reply_id}

        state, attempts = update_state(c, conversation, context.state, change)
        expected_state = {"turns": turn, "last_intent": intent, "last_reply_id": newest_id}
        check(attempts == 1, "written at the first attempt (no other writer)")
        check(state.version == context.state.version + 1 == turn, f"version {turn}: one up")
        check(json.loads(state.state_json) == expected_state, f"turns {turn}, last_intent {intent}")
        check(state.HasField("update_time"), "update_time set")
        again = get_state(c, conversation)
        check(again.version == turn and json.loads(again.state_json) == expected_state,
              "GetConversationState reads the same")
    return answer


def check_context_budget(c: Client, conversation: str, newest) -> None:
    m = c.memory_pb
    tokens = newest.message.token_usage.output_tokens
    step(f"GetContext with a budget of exactly the newest reply's {tokens} tokens")
    context = c.call(
        c.memory.GetContext, m.GetContextRequest(conversation_id=conversation, token_budget=tokens)
    )
    check_context(m, context, conversation, newest.message.message_id, tokens)
    check([x.message_id for x in context.messages] == [newest.message.message_id], "that reply alone")
    check(context.token_count == tokens, "counted by its output_tokens")
    check(context.truncated, "truncated")
    check(context.state.version == len(USER_TURNS), "with the state")

    step("GetContext with a budget of 1 token: the newest message does not fit")
    context = c.call(
        c.memory.GetContext, m.GetContextRequest(conversation_id=conversation, token_budget=1)
    )
    check_context(m, context, conversation, newest.message.message_id, 1)
    check(len(context.messages) == 0, "no messages")
    check(context.truncated, "truncated")
    check(context.conversation.message_count == 4 + 2 * len(USER_TURNS), "the conversation still")
    check(context.state.version == len(USER_TURNS), "and its state")


def check_state_conflicts(c: Client, conversation: str) -> None:
    m = c.memory_pb
    before = get_state(c, conversation)
    stale = before.version - 1
    step(f"UpdateConversationState on a stale version ({stale}, the state is at {before.version})")
    try:
        c.call(
            c.memory.UpdateConversationState,
            m.UpdateConversationStateRequest(
                conversation_id=conversation, expected_version=stale, state_json="{}"
            ),
        )
        raise AssertionError("a write on a stale version succeeded")
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.ABORTED, "ABORTED")
        status, _, infos = rich_error(err)
        check(status.code == code_pb2.ABORTED, "google.rpc.Status code 10")
        check(
            [(i.reason, i.domain) for i in infos] == [("STATE_VERSION_MISMATCH", "memory.maitre")],
            "ErrorInfo STATE_VERSION_MISMATCH in memory.maitre",
        )
        check(
            infos[0].metadata.get("current_version") == str(before.version),
            f"current_version {before.version}, the real one",
        )
        check(infos[0].metadata.get("expected_version") == str(stale), f"expected_version {stale}")
    after = get_state(c, conversation)
    check(after.version == before.version, "nothing written: same version")
    check(json.loads(after.state_json) == json.loads(before.state_json), "nothing written: same state")

    step("another writer comes first: ABORTED, read again, redo the change, retry")
    note = "asked for a window table"
    other = c.call(
        c.memory.UpdateConversationState,
        m.UpdateConversationStateRequest(
            conversation_id=conversation,
            expected_version=before.version,
            merge_patch_json=json.dumps({"notes": ["deposit reminder sent"]}),
        ),
    ).state
    check(other.version == before.version + 1, "the other writer's version one up")

    def add_note(state):
        notes = state.get("notes") or []
        return None if note in notes else {"notes": notes + [note]}

    state, attempts = update_state(c, conversation, before, add_note)  # `before` is stale now
    written = json.loads(state.state_json)
    check(attempts == 2, "written at the second attempt")
    check(state.version == before.version + 2, "one up from the other write")
    check(written.get("notes") == ["deposit reminder sent", note], "the other write kept, ours added")
    check(written.get("turns") == len(USER_TURNS), f"turns still {len(USER_TURNS)}")


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


# ---------------------------------------------------------------- change feed
def feed_start(c: Client, user: str) -> str:
    """Where a gateway that starts now resumes from: the cursor of the
    stream's opening heartbeat (saved before anything is stored)."""
    m = c.memory_pb
    step("WatchMessages from now: the opening heartbeat gives the starting cursor")
    stream = c.memory.WatchMessages(
        m.WatchMessagesRequest(user_id=user), timeout=10, metadata=c.metadata
    )
    first = next(stream)
    stream.cancel()
    check(first.WhichOneof("event") == "heartbeat", "the stream opens with a heartbeat")
    check(first.cursor != "", "with a cursor")
    return first.cursor


def consume_feed(c: Client, user: str, cursor: str, deliver, until, disconnect_after=None) -> str:
    """A channel gateway's loop: follow WatchMessages from `cursor`, hand each
    message to `deliver` once (the feed is at-least-once: drop repeats by
    message id), keep the last cursor, and reconnect from it whenever the
    stream ends: UNAVAILABLE (a server restart, WATCHER_TOO_SLOW), a
    deadline, or our own disconnect. Returns the cursor to resume from once
    `until()` holds. OUT_OF_RANGE (CURSOR_EXPIRED) would need a re-read of
    the conversations instead, and is left to the caller here. A real
    gateway also keeps the cursor (and the ids it sent recently) in durable
    storage, so that a restart resumes instead of starting over, and waits a
    little (with backoff) before reconnecting after INTERNAL or
    RESOURCE_EXHAUSTED; this example stops on them."""
    m = c.memory_pb
    seen: set[str] = set()
    for _ in range(20):
        stream = c.memory.WatchMessages(
            m.WatchMessagesRequest(cursor=cursor, user_id=user), timeout=3, metadata=c.metadata
        )
        try:
            for response in stream:
                if response.WhichOneof("event") == "message":
                    message = response.message
                    if message.message_id not in seen:
                        seen.add(message.message_id)
                        deliver(message, response.channel)
                cursor = response.cursor  # only after the message was handled
                if until():
                    stream.cancel()
                    return cursor
                if disconnect_after is not None and len(seen) == disconnect_after:
                    disconnect_after = None
                    stream.cancel()  # as if the gateway restarted here
                    break
        except grpc.RpcError as err:
            if err.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
            ):
                raise
        # Reconnect from the last cursor handled.
    raise AssertionError("the feed never delivered everything")


def follow_the_feed(c: Client, user: str, conversation: str, start: str) -> None:
    m = c.memory_pb
    stored = c.call(
        c.memory.ListMessages,
        m.ListMessagesRequest(conversation_id=conversation, page_size=500),
    ).messages
    want = [x.message_id for x in stored]
    step(
        f"a gateway's loop over WatchMessages from the saved cursor {start}: "
        f"{len(want)} messages, with a disconnect after the second"
    )
    delivered: list[str] = []
    channels: set[str] = set()

    def deliver(message, channel):
        delivered.append(message.message_id)
        channels.add(channel)

    cursor = consume_feed(
        c, user, start, deliver, until=lambda: len(delivered) >= len(want), disconnect_after=2
    )
    check(sorted(delivered) == sorted(want), "every stored message delivered once")
    by_sequence = [x.message_id for x in sorted(stored, key=lambda x: x.sequence)]
    check(delivered == by_sequence, "in the conversation's order")
    check(channels == {"python"}, "with the conversation's channel")

    step("one more message: the loop resumes from its cursor and gets only that")
    extra = c.call(
        c.memory.StoreMessage,
        m.StoreMessageRequest(
            conversation_id=conversation, user_id=user, channel="python",
            role=m.ROLE_ASSISTANT, content="your table is ready",
            request_id=f"{user}-feed-extra",
        ),
    ).message
    delivered.clear()
    consume_feed(c, user, cursor, deliver, until=lambda: len(delivered) >= 1)
    check(delivered == [extra.message_id], "just the new message")


# ---------------------------------------------------------------- lifecycle
def booking_lifecycle(c: Client, args, customer: str) -> None:
    """Hold -> payment -> booking -> move -> reminder -> follow-up, and a paid
    booking cancelled, a hold released."""
    b = c.booking_pb
    lead = args.reminder_lead

    def slot(starts_in: float, lasts: float, capacity: int, label: str) -> str:
        return c.call(
            c.booking.CreateSlot,
            b.CreateSlotRequest(
                start_time=timestamp(starts_in),
                end_time=timestamp(starts_in + lasts),
                capacity=capacity,
                label=label,
                request_id=f"{customer}-{label}",
            ),
        ).slot.slot_id

    step("HoldSeats: 2 seats held while the customer pays")
    rooftop = slot(lead + 6, 1, 2, "Python rooftop")
    garden = slot(lead + 8, 1, 2, "Python garden")
    hold = c.call(
        c.booking.HoldSeats,
        b.HoldSeatsRequest(customer_id=customer, slot_id=rooftop, party_size=2, request_id=f"{customer}-hold"),
    ).hold
    check(hold.state == b.HOLD_STATE_HELD, "HELD")
    try:
        c.call(
            c.booking.HoldSeats,
            b.HoldSeatsRequest(customer_id=f"{customer}-2", slot_id=rooftop, party_size=1, request_id="other"),
        )
        raise AssertionError("a second hold on a fully held slot succeeded")
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.FAILED_PRECONDITION, "held seats are taken")

    step("ConfirmHold: the hold becomes a booking (a retry replays)")
    confirm = b.ConfirmHoldRequest(
        hold_id=hold.hold_id,
        customer_id=customer,
        customer_name="Py Thon",
        deposit=b.Money(currency_code="EUR", amount_minor=3000),
    )
    booking = c.call(c.booking.ConfirmHold, confirm).booking
    check(booking.state == b.BOOKING_STATE_CONFIRMED, "CONFIRMED")
    check(booking.request_id == f"hold:{hold.hold_id}", "keyed by the hold")
    again = c.call(c.booking.ConfirmHold, confirm)
    check(again.replayed and again.booking.booking_id == booking.booking_id, "the retry replays")

    step("RecordPayment, as the provider's webhook delivers it (twice)")
    payment = b.RecordPaymentRequest(
        booking_id=booking.booking_id,
        provider_reference=f"pi_{customer}",
        amount=b.Money(currency_code="EUR", amount_minor=3000),
    )
    paid = c.call(c.booking.RecordPayment, payment)
    check(paid.booking.deposit.state == b.PAYMENT_STATE_PAID, "PAID")
    check(c.call(c.booking.RecordPayment, payment).replayed, "the second delivery replays")

    step("MoveBooking to the garden: the reminder and the follow-up move with it")
    moved = c.call(
        c.booking.MoveBooking,
        b.MoveBookingRequest(booking_id=booking.booking_id, slot_id=garden, request_id=f"{customer}-move"),
    ).booking
    check(moved.slot_id == garden, "in the garden now")

    step(f"ListFollowUps until the reminder and the follow-up are SENT (at most {args.followup_wait + lead + 8} s)")
    deadline = time.monotonic() + args.followup_wait + lead + 8
    while True:
        follow_ups = c.call(
            c.booking.ListFollowUps, b.ListFollowUpsRequest(booking_id=booking.booking_id)
        ).follow_ups
        sent = {f.trigger: f for f in follow_ups if f.state == b.FOLLOW_UP_STATE_SENT}
        if set(sent) == {"pre_event", "post_event"}:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"not both SENT: {follow_ups}; BOOKING_REMINDER_LEAD={lead}s?")
        time.sleep(0.25)
    check("Python garden" in sent["pre_event"].rendered_text, "the reminder names the new slot")
    check(sent["pre_event"].sent_time.ToDatetime() <= sent["post_event"].sent_time.ToDatetime(), "reminder first")

    step("a paid booking cancelled: the deposit is owed back; a released hold frees its seats")
    cellar = slot(3600, 3600, 4, "Python cellar")
    held = c.call(
        c.booking.HoldSeats,
        b.HoldSeatsRequest(customer_id=customer, slot_id=cellar, party_size=2, request_id=f"{customer}-cellar"),
    ).hold
    later = c.call(
        c.booking.ConfirmHold,
        b.ConfirmHoldRequest(
            hold_id=held.hold_id,
            customer_id=customer,
            customer_name="Py Thon",
            deposit=b.Money(currency_code="EUR", amount_minor=1000),
        ),
    ).booking
    c.call(
        c.booking.RecordPayment,
        b.RecordPaymentRequest(
            booking_id=later.booking_id,
            provider_reference=f"pi_{customer}_cellar",
            amount=b.Money(currency_code="EUR", amount_minor=1000),
        ),
    )
    cancelled = c.call(
        c.booking.CancelBooking, b.CancelBookingRequest(booking_id=later.booking_id, reason="plans changed")
    ).booking
    check(cancelled.deposit.state == b.PAYMENT_STATE_REFUND_PENDING, "REFUND_PENDING")
    spare = c.call(
        c.booking.HoldSeats,
        b.HoldSeatsRequest(customer_id=customer, slot_id=cellar, party_size=1, request_id=f"{customer}-spare"),
    ).hold
    released = c.call(
        c.booking.ReleaseHold, b.ReleaseHoldRequest(hold_id=spare.hold_id, customer_id=customer)
    ).hold
    check(released.state == b.HOLD_STATE_RELEASED, "RELEASED")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-addr", default=os.environ.get("MEMORY_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--booking-addr", default=os.environ.get("BOOKING_ADDR", "127.0.0.1:50052"))
    parser.add_argument("--proto-dir", type=pathlib.Path, default=HERE.parent.parent / "proto")
    parser.add_argument("--token", default=os.environ.get("AUTH_TOKEN"), help="bearer token, if required")
    parser.add_argument("--slot-start-in", type=float, default=2.0)
    parser.add_argument("--followup-wait", type=float, default=30.0)
    parser.add_argument(
        "--reminder-lead", type=float, default=5.0, help="the stack's BOOKING_REMINDER_LEAD, in seconds"
    )
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
            feed_cursor = feed_start(client, user)
            conversation = store_conversation(client, user)
            check_conversation(client, user, conversation)
            newest_id = book_and_follow_up(client, args, user, conversation)
            newest = turn_loop(client, user, conversation, newest_id)
            check_context_budget(client, conversation, newest)
            check_state_conflicts(client, conversation)
            check_rich_errors(client, user)
            follow_the_feed(client, user, conversation, feed_cursor)
            booking_lifecycle(client, args, f"{user}-life")
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
