import io
import os
import tempfile
import unittest

import yaml

from deploycheck.auth import allows, check_auth_mode_none, check_compose_auth, check_render_auth, is_placeholder, \
    parse_grants, parse_token_list
from deploycheck.common import Report
from deploycheck.tests.fixtures import REPO_ROOT, changed, cm, deployment

SERVED = {"maitre.memory.v1.MemoryService/" + m for m in ("StoreMessage", "GetEmotionHistory", "DeleteUserData")}
MEM_TOKEN = "CHANGE-ME-booking-service-token"


def served_pod(name, binary, items):
    d = deployment(name, binary, name + "-config")
    spec = d["spec"]["template"]["spec"]
    spec["containers"][0]["volumeMounts"] = [{"name": "secrets", "mountPath": "/s"}]
    spec["volumes"] = [{"name": "secrets", "secret": {"secretName": name + "-secrets",
                                                     "items": [{"key": k, "path": k} for k in items]}}]
    return d


def secret(name, example=True, **data):
    meta = {"name": name, "annotations": {"maitre.io/example": "true"} if example else {}}
    return {"kind": "Secret", "metadata": meta, "stringData": data}


# A whole render: the services' credentials, grants, mounted files, token Secrets.
GOOD = [served_pod("memory-service", "memory-service", ["auth-tokens"]),
        served_pod("booking-service", "booking-service", ["auth-tokens", "memory-service-token"]),
        cm("memory-service-config", AUTH_TOKENS_FILE="/s/auth-tokens",
           AUTH_GRANTS="assistant=StoreMessage\nbooking-service=GetEmotionHistory,StoreMessage,DeleteUserData\nadmin=*"),
        cm("booking-service-config", AUTH_TOKENS_FILE="/s/auth-tokens", BOOKING_MEMORY_TOKEN_FILE="/s/memory-service-token",
           BOOKING_MEMORY_URL="http://memory-service:50051", AUTH_GRANTS="assistant=CreateBooking;admin=*"),
        secret("memory-service-secrets", **{"auth-tokens": f"booking-service:{MEM_TOKEN}\nassistant:CHANGE-ME-assistant-0001\n"}),
        secret("booking-service-secrets", **{"auth-tokens": "assistant:CHANGE-ME-assistant-0002\n",
                                             "memory-service-token": MEM_TOKEN})]


def auth_errors(docs):
    r = Report(io.StringIO())
    check_render_auth("t", docs, REPO_ROOT, r)
    return r.errors


class GrantsAndTokens(unittest.TestCase):
    def test_grants(self):
        g, problems = parse_grants("assistant=StoreMessage,MemoryService/GetEmotionHistory\nbooking-service=GetEmotionHistory;"
                                   "admin=*;ops=maitre.memory.v1.MemoryService/*", SERVED)
        self.assertEqual(problems, [])
        self.assertTrue(allows(g, "assistant", "maitre.memory.v1.MemoryService/GetEmotionHistory"))
        self.assertFalse(allows(g, "booking-service", "maitre.memory.v1.MemoryService/StoreMessage"))
        self.assertTrue(allows(g, "admin", "x.Y/Z") and allows(g, "ops", "maitre.memory.v1.MemoryService/DeleteUserData"))
        self.assertEqual(len(parse_grants("a=Nope,Other/X;b c=*;d", SERVED)[1]), 4)

    def test_token_lists(self):
        entries, problems = parse_token_list("# c\nbooking-service:0123456789abcdef\n\nadmin:fedcba9876543210\n")
        self.assertEqual(entries, [("booking-service", "0123456789abcdef"), ("admin", "fedcba9876543210")])
        self.assertEqual(problems, [])
        self.assertEqual(len(parse_token_list("short:abc,noname,x:0123456789abcdef,y:0123456789abcdef")[1]), 3)
        self.assertTrue(parse_token_list("# only a comment\n")[1])
        self.assertTrue(is_placeholder("CHANGE-ME-token") and is_placeholder("an-Example-1234567"))
        self.assertFalse(is_placeholder("9f2c" * 8))

    def test_auth_mode_none(self):
        r = Report(io.StringIO())
        check_auth_mode_none("t", {"AUTH_MODE": " None "}, r)
        check_auth_mode_none("t", {"AUTH_MODE": "required"}, r)
        self.assertEqual(len(r.errors), 1)


class Render(unittest.TestCase):
    def test_good_render_passes(self):
        self.assertEqual(auth_errors(GOOD), [])

    def test_each_bad_render_fails(self):
        cases = [
            (2, lambda c: c["data"].update(AUTH_MODE="None"), "AUTH_MODE=none"),
            (2, lambda c: c["data"].update(AUTH_GRANTS="assistant=StoreMessage;admin=*"), "booking-service ungranted"),
            (2, lambda c: c["data"].update(AUTH_GRANTS="booking-service=GetEmotionHistory,StoreMessage,CreateBooking"),
             "a method of another service"),
            (2, lambda c: c["data"].pop("AUTH_TOKENS_FILE"), "no credentials"),
            (3, lambda c: c["data"].pop("AUTH_GRANTS"), "no AUTH_GRANTS"),
            (3, lambda c: c["data"].update(BOOKING_MEMORY_URL="https://memory-service:50051"), "https without a CA"),
            (3, lambda c: c["data"].update(BOOKING_MEMORY_TOKEN_FILE="/elsewhere/token"), "file not mounted"),
            (5, lambda s: s["stringData"].update({"memory-service-token": "CHANGE-ME-another-token-0001"}),
             "not the token memory-service lists"),
            (5, lambda s: s["stringData"].update({"auth-tokens": "assistant:9f2c9f2c9f2c9f2c9f2c\n"}), "usable example"),
            (5, lambda s: s["metadata"].update(annotations={}), "placeholders in a real Secret"),
            (4, lambda s: s["stringData"].update({"auth-tokens": "# nothing\n"}), "empty token list"),
            (4, lambda s: s["stringData"].update({"auth-tokens": f"stranger:{MEM_TOKEN}\n"}), "ungranted name"),
        ]
        for i, change, what in cases:
            with self.subTest(what):
                errors = auth_errors(changed(GOOD, i, change))
                self.assertTrue(errors)
                if what == "AUTH_MODE=none":
                    self.assertEqual(len(errors), 1, errors)


class Compose(unittest.TestCase):
    def compose_errors(self, env, ports):
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "compose.yaml")
            with open(p, "w") as f:
                yaml.safe_dump({"services": {"memory-service": {"command": ["memory-service", "serve"],
                                                                 "environment": env, "ports": ports}}}, f)
            r = Report(io.StringIO())
            check_compose_auth(p, r)
            return r.errors

    def test_loopback_without_auth_passes(self):
        self.assertEqual(self.compose_errors({"AUTH_MODE": "none"}, ["127.0.0.1:50051:50051", {"target": 1, "host_ip": "::1"}]), [])
        self.assertEqual(self.compose_errors({"AUTH_TOKENS": "a:0123456789abcdef"}, ["50051:50051"]), [])

    def test_open_ports_or_missing_credentials_fail(self):
        self.assertTrue(self.compose_errors({"AUTH_MODE": "none"}, ["50051:50051"]))
        self.assertTrue(self.compose_errors({"AUTH_MODE": "none"}, [{"target": 1, "published": 1}]))
        self.assertTrue(self.compose_errors({"AUTH_MODE": "none", "AUTH_TOKENS": "a:b"}, []))
        self.assertTrue(self.compose_errors({}, ["50051:50051"]))


if __name__ == "__main__":
    unittest.main()
