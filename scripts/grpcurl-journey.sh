#!/usr/bin/env bash
# The whole maitre journey with the real grpcurl, the way a person debugging
# the services would type it. Every grpcurl command is printed (ready to copy)
# before it runs; any unexpected answer stops the script with a message and a
# non-zero exit.
#
#   scripts/grpcurl-journey.sh
#
# Needs a running stack whose follow-ups go out right after the event and
# whose reminders go out a few seconds before it:
#
#   BOOKING_FOLLOWUP_DELAY=0s BOOKING_REMINDER_LEAD=5s BOOKING_WORKER_POLL_INTERVAL=100ms scripts/dev-up.sh
#
# Steps: reflection (list, describe) and health (readiness and liveness) of
# both services; StoreMessage x3 with negative emotions into a new
# conversation; GetConversation (3 messages, trend DECLINING);
# GetEmotionHistory; CreateSlot (starts in ~3 s, lasts 1 s); CreateBooking for
# that conversation; ListFollowUps until the follow-up is SENT; ListMessages
# shows the assistant follow-up exactly once; the conversation's state:
# GetConversationState (version 0, "{}"), UpdateConversationState with
# expected_version 0 and a whole state_json, then with expected_version 1 and
# a merge_patch_json, then a stale write (expected_version 1 again) that must
# fail with Aborted, STATE_VERSION_MISMATCH, and write nothing; GetContext
# with a token_budget that fits the whole conversation (4 messages, oldest
# first, the follow-up last, with the state) and with a budget of 1 token (no
# message, truncated); and one bad call (StoreMessage without a role) that
# must fail with InvalidArgument. Throughout, a WatchMessages stream of the
# user runs in the background: it must print the three messages and the
# follow-up, and a second WatchMessages from the first message's cursor must
# print the rest and not the first. Then the booking lifecycle of a second
# customer, with its own watcher: HoldSeats (another customer's hold finds
# the slot full), ConfirmHold (twice: a replay), RecordPayment (twice: a
# replay), MoveBooking to another slot, ListFollowUps until the reminder
# (worded with the new slot) and the follow-up are SENT, the watcher
# printing the customer's message, the reminder and the follow-up in that
# order; and on a slot an hour ahead, a paid booking cancelled
# (REFUND_PENDING) and a hold released (RELEASED).
#
# grpcurl prints answers as proto3 JSON: int64 fields are strings
# ("version": "1"), a oneof shows only its set member, and fields at their
# default (0, false, "", empty lists) are left out, so a state never written
# has no "version" at all.
#
# Environment (all optional):
#   MEMORY_ADDR     memory-service host:port           (127.0.0.1:50051)
#   BOOKING_ADDR    booking-service host:port          (127.0.0.1:50052)
#   AUTH_TOKEN      bearer token sent to both, when the stack requires one
#   GRPCURL         grpcurl binary (default: the one scripts/install-tools.sh
#                   installs, installed on first use)
#   SLOT_START_IN   seconds from now until the slot starts (3: each grpcurl
#                   call takes a few hundred ms, the booking must come first)
#   FOLLOWUP_WAIT   seconds to wait for the follow-up to be SENT (30)
#   REMINDER_LEAD   the stack's BOOKING_REMINDER_LEAD, in seconds (5)
set -euo pipefail

me="grpcurl-journey"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: FAILED: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
memory_addr="${MEMORY_ADDR:-127.0.0.1:50051}"
booking_addr="${BOOKING_ADDR:-127.0.0.1:50052}"
start_in="${SLOT_START_IN:-3}"
followup_wait="${FOLLOWUP_WAIT:-30}"
reminder_lead="${REMINDER_LEAD:-5}"

command -v python3 >/dev/null 2>&1 || die "python3 is needed to read grpcurl's JSON answers"

# ------------------------------------------------------------ grpcurl
is_elf() { [[ -f "$1" && -x "$1" && "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" == '177ELF' ]]; }
grpcurl="${GRPCURL:-}"
if [[ -z "$grpcurl" ]]; then
    grpcurl="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}/bin/grpcurl"
    if ! is_elf "$(readlink -f "$grpcurl" 2>/dev/null || echo "$grpcurl")"; then
        log "no grpcurl at $grpcurl yet: running scripts/install-tools.sh"
        bin="$("$root/scripts/install-tools.sh" | tail -n 1)" || die "scripts/install-tools.sh failed"
        grpcurl="$bin/grpcurl"
    fi
fi
[[ -x "$grpcurl" ]] || die "grpcurl not found at $grpcurl"
grpcurl_version="$("$grpcurl" -version 2>&1)" || die "$grpcurl -version failed: $grpcurl_version"
log "using $grpcurl ($grpcurl_version)"
log "memory-service at $memory_addr, booking-service at $booking_addr"

# ------------------------------------------------------------ helpers
# quote ARG: ARG as a reader would type it in a POSIX shell.
quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:@%+=,-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

auth=()
[[ -z "${AUTH_TOKEN:-}" ]] || auth=(-H "authorization: Bearer $AUTH_TOKEN")

out=""   # what the last grpcurl call printed (stdout and stderr)
rc=0     # its exit status
# call ARGS...: prints the command, runs it, keeps its output in $out, $rc.
call() {
    local -a cmd=("$grpcurl" -plaintext "${auth[@]}" "$@")
    local shown="" a
    for a in "${cmd[@]}"; do
        if [[ -n "${AUTH_TOKEN:-}" && "$a" == *"$AUTH_TOKEN"* ]]; then
            a="${a//$AUTH_TOKEN/\$AUTH_TOKEN}"   # never print the secret
        fi
        shown+="$(quote "$a") "
    done
    printf '\n$ %s\n' "${shown% }"
    rc=0
    out="$("${cmd[@]}" 2>&1)" || rc=$?
    printf '%s\n' "$out" | sed 's/^/  /'
}

# ok ARGS...: call, and die unless it succeeded.
ok() {
    call "$@"
    ((rc == 0)) || die "grpcurl exited $rc for: ${*: -1}"
}

# py EXPR: evaluates the Python expression EXPR over `d`, the JSON in $out.
py() {
    python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
v = eval(sys.argv[1])
print(json.dumps(v) if isinstance(v, (dict, list)) else v)
' "$1" <<<"$out" || die "could not read $1 from the answer above"
}

# expect WHAT ACTUAL WANTED
expect() {
    [[ "$2" == "$3" ]] || die "$1: got '$2', expected '$3'"
    log "ok: $1 = $3"
}

# contains WHAT NEEDLE: $out must contain NEEDLE.
contains() {
    grep -qF -- "$2" <<<"$out" || die "$1: '$2' not in the answer above"
    log "ok: $1"
}

# matches WHAT REGEX: $out must match REGEX (extended). For error details,
# which grpcurl prints as compact or as indented JSON, depending on its version.
matches() {
    grep -qE -- "$2" <<<"$out" || die "$1: /$2/ not in the answer above"
    log "ok: $1"
}

uuid() {
    if [[ -r /proc/sys/kernel/random/uuid ]]; then
        cat /proc/sys/kernel/random/uuid
    else
        python3 -c 'import uuid; print(uuid.uuid4())'
    fi
}

# json_string TEXT: TEXT as a JSON string, e.g. a state inside a request.
json_string() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

# rfc3339 SECONDS_FROM_NOW
rfc3339() { date -u -d "+$1 seconds" +%Y-%m-%dT%H:%M:%S.%3NZ; }

memory_svc=maitre.memory.v1.MemoryService
booking_svc=maitre.booking.v1.BookingService

# ------------------------------------------------------------ reflection
log "== reflection"
ok "$memory_addr" list
for s in "$memory_svc" grpc.health.v1.Health grpc.reflection.v1alpha.ServerReflection; do
    contains "memory-service lists $s" "$s"
done
ok "$booking_addr" list
for s in "$booking_svc" grpc.health.v1.Health grpc.reflection.v1alpha.ServerReflection; do
    contains "booking-service lists $s" "$s"
done

ok "$memory_addr" describe "$memory_svc"
for m in StoreMessage GetConversation ListMessages GetEmotionHistory ListConversations CloseConversation \
    GetConversationState UpdateConversationState GetContext DeleteUserData WatchMessages; do
    contains "MemoryService describes $m" "rpc $m ("
done
ok "$booking_addr" describe "$booking_svc"
for m in CreateSlot ListAvailability CreateBooking GetBooking ListBookings CancelBooking ListFollowUps EraseCustomer \
    HoldSeats ConfirmHold ReleaseHold MoveBooking RecordPayment; do
    contains "BookingService describes $m" "rpc $m ("
done
ok "$memory_addr" describe maitre.memory.v1.StoreMessageRequest
contains "StoreMessageRequest has user_id" "string user_id = 2;"

# ------------------------------------------------------------ health
log "== health"
ok -d '{"service":"maitre.memory.v1.MemoryService"}' "$memory_addr" grpc.health.v1.Health/Check
expect "memory-service readiness" "$(py 'd["status"]')" SERVING
ok -d '{"service":"liveness"}' "$memory_addr" grpc.health.v1.Health/Check
expect "memory-service liveness" "$(py 'd["status"]')" SERVING
ok -d '{"service":"maitre.booking.v1.BookingService"}' "$booking_addr" grpc.health.v1.Health/Check
expect "booking-service readiness" "$(py 'd["status"]')" SERVING
ok -d '{"service":"liveness"}' "$booking_addr" grpc.health.v1.Health/Check
expect "booking-service liveness" "$(py 'd["status"]')" SERVING

# ------------------------------------------------------------ memory
log "== a conversation with three negative messages"
conversation="$(uuid)"
user="grpcurl-$(uuid | cut -c1-8)"

# The change feed: a watcher of this user's messages, in the background for
# the rest of the journey (as a channel gateway would follow the feed).
watch_out="$(mktemp)"
watch_pid=""
stop_watch() { [[ -z "$watch_pid" ]] || kill "$watch_pid" 2>/dev/null || true; rm -f "$watch_out"; }
trap stop_watch EXIT
watch_args=(-max-time 120 -d "{\"user_id\":\"$user\"}" "$memory_addr" "$memory_svc/WatchMessages")
shown="grpcurl -plaintext"
for a in "${watch_args[@]}"; do shown+=" $(quote "$a")"; done
printf '\n$ %s &\n' "$shown"
"$grpcurl" -plaintext "${auth[@]}" "${watch_args[@]}" >"$watch_out" 2>&1 &
watch_pid=$!
# The stream opens with a heartbeat: from then on nothing stored is missed.
for _ in $(seq 100); do grep -q '"heartbeat"' "$watch_out" && break; sleep 0.1; done
grep -q '"heartbeat"' "$watch_out" || { cat "$watch_out" >&2; die "WatchMessages sent no opening heartbeat"; }
log "ok: WatchMessages is open (opening heartbeat received)"
scores=(-0.2 -0.5 -0.8)
labels=(sadness anger anger)
for i in 0 1 2; do
    body="{\"conversation_id\":\"$conversation\",\"user_id\":\"$user\",\"channel\":\"grpcurl\",\"role\":\"ROLE_USER\",\"content\":\"message $((i + 1)): still waiting for my table\",\"emotion\":{\"score\":${scores[$i]},\"label\":\"${labels[$i]}\"},\"request_id\":\"$user-msg-$i\"}"
    ok -d "$body" "$memory_addr" "$memory_svc/StoreMessage"
    expect "message $((i + 1)) sequence" "$(py 'd["message"]["sequence"]')" "$((i + 1))"
    expect "message $((i + 1)) conversation" "$(py 'd["message"]["conversationId"]')" "$conversation"
    expect "conversation count after message $((i + 1))" "$(py 'd["conversationMessageCount"]')" "$((i + 1))"
done

ok -d "{\"conversation_id\":\"$conversation\"}" "$memory_addr" "$memory_svc/GetConversation"
expect "message_count" "$(py 'd["conversation"]["messageCount"]')" 3
expect "user_id" "$(py 'd["conversation"]["userId"]')" "$user"
expect "emotion trend" "$(py 'd["conversation"]["emotionStats"]["trend"]')" EMOTION_TREND_DECLINING
expect "scored messages" "$(py 'd["conversation"]["emotionStats"]["scoredMessageCount"]')" 3
expect "average score" "$(py 'round(d["conversation"]["emotionStats"]["averageScore"], 6)')" -0.5
expect "label counts" "$(py 'sorted(d["conversation"]["emotionStats"]["labelCounts"].items())')" '[["anger", "2"], ["sadness", "1"]]'

ok -d "{\"conversation_id\":\"$conversation\",\"limit\":10}" "$memory_addr" "$memory_svc/GetEmotionHistory"
expect "emotion history scores" "$(py '[p["score"] for p in d["points"]]')" "[-0.2, -0.5, -0.8]"
expect "emotion history labels" "$(py '[p["label"] for p in d["points"]]')" '["sadness", "anger", "anger"]'

# ------------------------------------------------------------ booking
log "== a slot, a booking, its follow-up"
start="$(rfc3339 "$start_in")"
end="$(rfc3339 "$((start_in + 1))")"
ok -d "{\"start_time\":\"$start\",\"end_time\":\"$end\",\"capacity\":4,\"label\":\"grpcurl table\",\"request_id\":\"$user-slot\"}" \
    "$booking_addr" "$booking_svc/CreateSlot"
slot="$(py 'd["slot"]["slotId"]')"
expect "slot capacity" "$(py 'd["slot"]["capacity"]')" 4
expect "slot free seats" "$(py 'd["slot"]["availableSeats"]')" 4

ok -d "{\"customer_id\":\"$user\",\"customer_name\":\"Grace Curl\",\"conversation_id\":\"$conversation\",\"slot_id\":\"$slot\",\"party_size\":2,\"deposit\":{\"currency_code\":\"EUR\",\"amount_minor\":2500},\"request_id\":\"$user-booking\"}" \
    "$booking_addr" "$booking_svc/CreateBooking"
booking="$(py 'd["booking"]["bookingId"]')"
expect "booking state" "$(py 'd["booking"]["state"]')" BOOKING_STATE_CONFIRMED
expect "booking conversation" "$(py 'd["booking"]["conversationId"]')" "$conversation"
expect "deposit state" "$(py 'd["booking"]["deposit"]["state"]')" PAYMENT_STATE_PENDING

log "polling ListFollowUps until the follow-up is SENT (at most ${followup_wait} s)"
deadline=$((SECONDS + followup_wait))
state=""
while :; do
    ok -d "{\"booking_id\":\"$booking\"}" "$booking_addr" "$booking_svc/ListFollowUps"
    state="$(py '([f for f in d.get("followUps", []) if f["trigger"] == "post_event"] or [{}])[0].get("state", "")')"
    [[ "$state" == FOLLOW_UP_STATE_SENT ]] && break
    [[ "$state" == FOLLOW_UP_STATE_FAILED || "$state" == FOLLOW_UP_STATE_CANCELLED ]] \
        && die "the follow-up ended $state (see last_error above)"
    if ((SECONDS >= deadline)); then
        scheduled="$(py '(d.get("followUps") or [{}])[0].get("scheduledTime", "")')"
        die "no SENT follow-up after ${followup_wait} s (state '${state:-none}', scheduled '${scheduled:-?}'); does booking-service run with BOOKING_FOLLOWUP_DELAY=0s and a short BOOKING_WORKER_POLL_INTERVAL?"
    fi
    sleep 0.5
done
expect "follow-ups of the booking (no reminder: booked inside the lead)" "$(py 'len(d["followUps"])')" 1
expect "follow-up conversation" "$(py 'd["followUps"][0]["conversationId"]')" "$conversation"
expect "follow-up template (negative history)" "$(py 'd["followUps"][0]["templateKey"]')" service_recovery
followup_text="$(py 'd["followUps"][0]["renderedText"]')"
followup_message="$(py 'd["followUps"][0]["messageId"]')"

ok -d "{\"conversation_id\":\"$conversation\",\"page_size\":50}" "$memory_addr" "$memory_svc/ListMessages"
expect "messages in the conversation" "$(py 'len(d["messages"])')" 4
expect "assistant messages" "$(py 'len([m for m in d["messages"] if m["role"] == "ROLE_ASSISTANT"])')" 1
expect "the assistant message is the follow-up" \
    "$(py '[m["messageId"] for m in d["messages"] if m["role"] == "ROLE_ASSISTANT"][0]')" "$followup_message"
expect "its text" "$(py '[m["content"] for m in d["messages"] if m["role"] == "ROLE_ASSISTANT"][0]')" "$followup_text"

# ------------------------------------------------------------ state, context
log "== the conversation's state (test-and-set on its version) and GetContext"
ok -d "{\"conversation_id\":\"$conversation\"}" "$memory_addr" "$memory_svc/GetConversationState"
expect "state version before any write (0: left out)" "$(py 'd["state"].get("version", "0")')" 0
expect "state before any write" "$(py 'json.loads(d["state"]["stateJson"])')" '{}'

ok -d "{\"conversation_id\":\"$conversation\",\"expected_version\":0,\"state_json\":$(json_string '{"step":"booked","party_size":2}')}" \
    "$memory_addr" "$memory_svc/UpdateConversationState"
expect "first write: version" "$(py 'd["state"]["version"]')" 1
expect "first write: state" "$(py 'sorted(json.loads(d["state"]["stateJson"]).items())')" '[["party_size", 2], ["step", "booked"]]'

ok -d "{\"conversation_id\":\"$conversation\",\"expected_version\":1,\"merge_patch_json\":$(json_string '{"step":"followed_up","party_size":null,"table":{"seat":"window"}}')}" \
    "$memory_addr" "$memory_svc/UpdateConversationState"
expect "merge patch: version" "$(py 'd["state"]["version"]')" 2
expect "merge patch: null removes, objects merge" "$(py 'sorted(json.loads(d["state"]["stateJson"]).items())')" '[["step", "followed_up"], ["table", {"seat": "window"}]]'

call -d "{\"conversation_id\":\"$conversation\",\"expected_version\":1,\"state_json\":$(json_string '{}')}" \
    "$memory_addr" "$memory_svc/UpdateConversationState"
((rc != 0)) || die "UpdateConversationState on the stale version 1 succeeded"
contains "stale write refused with Aborted (grpcurl exit $rc)" "Aborted"
matches "ErrorInfo reason STATE_VERSION_MISMATCH" '"reason": ?"STATE_VERSION_MISMATCH"'
matches "ErrorInfo metadata current_version 2, the real version" '"current_version": ?"2"'

ok -d "{\"conversation_id\":\"$conversation\"}" "$memory_addr" "$memory_svc/GetConversationState"
expect "nothing written by the stale write: version" "$(py 'd["state"]["version"]')" 2
expect "nothing written by the stale write: state" "$(py 'sorted(json.loads(d["state"]["stateJson"]).items())')" '[["step", "followed_up"], ["table", {"seat": "window"}]]'

log "== the change feed: what the watcher printed"
# watched: the message ids and cursors the background watcher printed so far.
watched() {
    python3 -c '
import json, sys
text, at, decoder, seen = open(sys.argv[1]).read(), 0, json.JSONDecoder(), []
while True:
    at = text.find("{", at)
    if at < 0:
        break
    try:
        obj, at = decoder.raw_decode(text, at)
    except ValueError:
        at += 1
        continue
    if "message" in obj:
        seen.append((obj["message"]["messageId"], obj["cursor"], obj.get("channel", "")))
print(json.dumps(seen))
' "$watch_out"
}
for _ in $(seq 100); do
    [[ "$(watched | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 4 ]] && break
    sleep 0.1
done
sed 's/^/  /' "$watch_out"
seen="$(watched)"
out="$seen"
expect "watched: the three messages and the follow-up" "$(py 'len(d)')" 4
expect "watched: the follow-up last" "$(py 'd[-1][0]')" "$followup_message"
expect "watched: with their channel" "$(py 'd[0][2]')" grpcurl
first_cursor="$(py 'd[0][1]')"
stop_watch
watch_pid=""

log "== resuming the feed from the first message's cursor (ends at -max-time)"
call -max-time 3 -d "{\"cursor\":\"$first_cursor\",\"user_id\":\"$user\"}" "$memory_addr" "$memory_svc/WatchMessages"
contains "resumed: the second message" "message 2: still waiting"
contains "resumed: the follow-up" "$followup_message"
if grep -qF -- "message 1: still waiting" <<<"$out"; then die "resumed: the first message came again"; fi
log "ok: resumed after the cursor, nothing before it"

ok -d "{\"conversation_id\":\"$conversation\",\"token_budget\":4096}" "$memory_addr" "$memory_svc/GetContext"
expect "context: the whole conversation, oldest first" "$(py '[m["sequence"] for m in d["messages"]]')" '["1", "2", "3", "4"]'
expect "context: the follow-up last" "$(py 'd["messages"][-1]["messageId"]')" "$followup_message"
expect "context: not truncated" "$(py 'd.get("truncated", False)')" False
expect "context: tokens within the budget" "$(py '0 < int(d["tokenCount"]) <= 4096')" True
expect "context: the conversation" "$(py 'd["conversation"]["messageCount"]')" 4
expect "context: its emotion trend" "$(py 'd["conversation"]["emotionStats"]["trend"]')" EMOTION_TREND_DECLINING
expect "context: its state" "$(py 'd["state"]["version"]')" 2

ok -d "{\"conversation_id\":\"$conversation\",\"token_budget\":1}" "$memory_addr" "$memory_svc/GetContext"
expect "1-token context: no message" "$(py 'len(d.get("messages", []))')" 0
expect "1-token context: truncated" "$(py 'd.get("truncated", False)')" True
expect "1-token context: still the state" "$(py 'd["state"]["version"]')" 2

# ------------------------------------------------------------ lifecycle
log "== the booking lifecycle: hold -> payment -> booking -> reminder -> follow-up -> feed"
customer="grpcurl-life-$(uuid | cut -c1-8)"
life_conversation="$(uuid)"
life_out="$(mktemp)"
life_pid=""
stop_life() { [[ -z "$life_pid" ]] || kill "$life_pid" 2>/dev/null || true; rm -f "$life_out"; }
trap 'stop_watch; stop_life' EXIT
life_args=(-max-time 120 -d "{\"user_id\":\"$customer\"}" "$memory_addr" "$memory_svc/WatchMessages")
shown="grpcurl -plaintext"
for a in "${life_args[@]}"; do shown+=" $(quote "$a")"; done
printf '\n$ %s &\n' "$shown"
"$grpcurl" -plaintext "${auth[@]}" "${life_args[@]}" >"$life_out" 2>&1 &
life_pid=$!
for _ in $(seq 100); do grep -q '"heartbeat"' "$life_out" && break; sleep 0.1; done
grep -q '"heartbeat"' "$life_out" || { cat "$life_out" >&2; die "the second WatchMessages sent no opening heartbeat"; }

ok -d "{\"conversation_id\":\"$life_conversation\",\"user_id\":\"$customer\",\"channel\":\"grpcurl\",\"role\":\"ROLE_USER\",\"content\":\"a table for two on the rooftop, please\",\"emotion\":{\"score\":0.6,\"label\":\"joy\"},\"request_id\":\"$customer-msg\"}" \
    "$memory_addr" "$memory_svc/StoreMessage"
life_first="$(py 'd["message"]["messageId"]')"

# Two slots a few seconds ahead, both starting after the reminder lead.
rooftop_in=$((reminder_lead + 6))
garden_in=$((reminder_lead + 8))
ok -d "{\"start_time\":\"$(rfc3339 "$rooftop_in")\",\"end_time\":\"$(rfc3339 "$((rooftop_in + 1))")\",\"capacity\":2,\"label\":\"grpcurl rooftop\",\"request_id\":\"$customer-rooftop\"}" \
    "$booking_addr" "$booking_svc/CreateSlot"
rooftop="$(py 'd["slot"]["slotId"]')"
ok -d "{\"start_time\":\"$(rfc3339 "$garden_in")\",\"end_time\":\"$(rfc3339 "$((garden_in + 1))")\",\"capacity\":2,\"label\":\"grpcurl garden\",\"request_id\":\"$customer-garden\"}" \
    "$booking_addr" "$booking_svc/CreateSlot"
garden="$(py 'd["slot"]["slotId"]')"

ok -d "{\"customer_id\":\"$customer\",\"slot_id\":\"$rooftop\",\"party_size\":2,\"request_id\":\"$customer-hold\"}" \
    "$booking_addr" "$booking_svc/HoldSeats"
hold="$(py 'd["hold"]["holdId"]')"
expect "hold state" "$(py 'd["hold"]["state"]')" HOLD_STATE_HELD
call -d "{\"customer_id\":\"$customer-other\",\"slot_id\":\"$rooftop\",\"party_size\":1,\"request_id\":\"$customer-other-hold\"}" \
    "$booking_addr" "$booking_svc/HoldSeats"
((rc != 0)) || die "a hold on a fully held slot succeeded"
matches "held seats are taken: SLOT_FULL" '"reason": ?"SLOT_FULL"'

confirm="{\"hold_id\":\"$hold\",\"customer_id\":\"$customer\",\"customer_name\":\"Grace Curl\",\"conversation_id\":\"$life_conversation\",\"deposit\":{\"currency_code\":\"EUR\",\"amount_minor\":3000}}"
ok -d "$confirm" "$booking_addr" "$booking_svc/ConfirmHold"
life_booking="$(py 'd["booking"]["bookingId"]')"
expect "confirmed booking" "$(py 'd["booking"]["state"]')" BOOKING_STATE_CONFIRMED
expect "its key comes from the hold" "$(py 'd["booking"]["requestId"]')" "hold:$hold"
ok -d "$confirm" "$booking_addr" "$booking_svc/ConfirmHold"
expect "confirming again replays" "$(py 'd["booking"]["bookingId"] + " " + str(d.get("replayed", False))')" "$life_booking True"

payment="{\"booking_id\":\"$life_booking\",\"provider_reference\":\"pi_$customer\",\"amount\":{\"currency_code\":\"EUR\",\"amount_minor\":3000}}"
ok -d "$payment" "$booking_addr" "$booking_svc/RecordPayment"
expect "deposit paid" "$(py 'd["booking"]["deposit"]["state"]')" PAYMENT_STATE_PAID
expect "with the provider's reference" "$(py 'd["booking"]["deposit"]["providerReference"]')" "pi_$customer"
ok -d "$payment" "$booking_addr" "$booking_svc/RecordPayment"
expect "the webhook delivered again replays" "$(py 'd.get("replayed", False)')" True

ok -d "{\"booking_id\":\"$life_booking\",\"slot_id\":\"$garden\",\"request_id\":\"$customer-move\"}" \
    "$booking_addr" "$booking_svc/MoveBooking"
expect "moved to the garden" "$(py 'd["booking"]["slotId"]')" "$garden"
expect "still paid" "$(py 'd["booking"]["deposit"]["state"]')" PAYMENT_STATE_PAID

log "polling ListFollowUps until the reminder and the follow-up are SENT (at most $((followup_wait + garden_in)) s)"
deadline=$((SECONDS + followup_wait + garden_in))
while :; do
    ok -d "{\"booking_id\":\"$life_booking\"}" "$booking_addr" "$booking_svc/ListFollowUps"
    sent="$(py 'sorted(f["trigger"] for f in d.get("followUps", []) if f["state"] == "FOLLOW_UP_STATE_SENT")')"
    [[ "$sent" == '["post_event", "pre_event"]' ]] && break
    ((SECONDS < deadline)) || die "not both SENT after the wait (sent: $sent); does booking-service run with BOOKING_REMINDER_LEAD=${reminder_lead}s and BOOKING_FOLLOWUP_DELAY=0s?"
    sleep 0.5
done
reminder_text="$(py '[f["renderedText"] for f in d["followUps"] if f["trigger"] == "pre_event"][0]')"
reminder_message="$(py '[f["messageId"] for f in d["followUps"] if f["trigger"] == "pre_event"][0]')"
life_followup="$(py '[f["messageId"] for f in d["followUps"] if f["trigger"] == "post_event"][0]')"
expect "the reminder names the slot it moved to" "$(py '"grpcurl garden" in [f["renderedText"] for f in d["followUps"] if f["trigger"] == "pre_event"][0]')" True
log "reminder: $reminder_text"

watched_life() { watch_out="$life_out" watched; }
for _ in $(seq 100); do
    [[ "$(watched_life | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 3 ]] && break
    sleep 0.1
done
sed 's/^/  /' "$life_out"
out="$(watched_life)"
expect "feed: the message, the reminder, the follow-up, in that order" "$(py '[m[0] for m in d]')" "[\"$life_first\", \"$reminder_message\", \"$life_followup\"]"
stop_life
life_pid=""

log "== a paid booking cancelled, a hold released"
later_in=3600
ok -d "{\"start_time\":\"$(rfc3339 "$later_in")\",\"end_time\":\"$(rfc3339 "$((later_in + 3600))")\",\"capacity\":4,\"label\":\"grpcurl cellar\",\"request_id\":\"$customer-cellar\"}" \
    "$booking_addr" "$booking_svc/CreateSlot"
cellar="$(py 'd["slot"]["slotId"]')"
ok -d "{\"customer_id\":\"$customer\",\"slot_id\":\"$cellar\",\"party_size\":2,\"request_id\":\"$customer-cellar-hold\"}" \
    "$booking_addr" "$booking_svc/HoldSeats"
cellar_hold="$(py 'd["hold"]["holdId"]')"
ok -d "{\"hold_id\":\"$cellar_hold\",\"customer_id\":\"$customer\",\"customer_name\":\"Grace Curl\",\"deposit\":{\"currency_code\":\"EUR\",\"amount_minor\":1000}}" \
    "$booking_addr" "$booking_svc/ConfirmHold"
cellar_booking="$(py 'd["booking"]["bookingId"]')"
ok -d "{\"booking_id\":\"$cellar_booking\",\"provider_reference\":\"pi_$customer-cellar\",\"amount\":{\"currency_code\":\"EUR\",\"amount_minor\":1000}}" \
    "$booking_addr" "$booking_svc/RecordPayment"
ok -d "{\"booking_id\":\"$cellar_booking\",\"reason\":\"plans changed\"}" "$booking_addr" "$booking_svc/CancelBooking"
expect "cancelled" "$(py 'd["booking"]["state"]')" BOOKING_STATE_CANCELLED
expect "a paid deposit is owed back" "$(py 'd["booking"]["deposit"]["state"]')" PAYMENT_STATE_REFUND_PENDING
ok -d "{\"customer_id\":\"$customer\",\"slot_id\":\"$cellar\",\"party_size\":1,\"request_id\":\"$customer-cellar-hold-2\"}" \
    "$booking_addr" "$booking_svc/HoldSeats"
second_hold="$(py 'd["hold"]["holdId"]')"
ok -d "{\"hold_id\":\"$second_hold\",\"customer_id\":\"$customer\"}" "$booking_addr" "$booking_svc/ReleaseHold"
expect "released" "$(py 'd["hold"]["state"]')" HOLD_STATE_RELEASED
ok -d "{\"start_time\":\"$(rfc3339 "$((later_in - 60))")\",\"end_time\":\"$(rfc3339 "$((later_in + 60))")\",\"min_available_seats\":4}" \
    "$booking_addr" "$booking_svc/ListAvailability"
expect "the cellar is free again" "$(py '[s["slotId"] for s in d.get("slots", []) if s["slotId"] == "'"$cellar"'"]')" "[\"$cellar\"]"

# ------------------------------------------------------------ bad input
log "== a bad call: StoreMessage without a role"
call -d "{\"conversation_id\":\"$conversation\",\"user_id\":\"$user\",\"content\":\"no role\"}" "$memory_addr" "$memory_svc/StoreMessage"
((rc != 0)) || die "StoreMessage without a role succeeded"
contains "refused with InvalidArgument (grpcurl exit $rc)" "InvalidArgument"
contains "the message names the role field" "role"

ok -d "{\"conversation_id\":\"$conversation\"}" "$memory_addr" "$memory_svc/GetConversation"
expect "nothing written by the bad call" "$(py 'd["conversation"]["messageCount"]')" 4

printf '\n%s: PASSED: reflection, health, the whole journey, the change feed, state and context, the booking lifecycle, and a refused bad call\n' "$me"
