import io
import unittest

import yaml

from deploycheck.common import Report
from deploycheck.compose import check_start_order
from deploycheck.tests.fixtures import repository, repository_file

COMPOSE = yaml.safe_load(repository_file("deploy/compose.yaml"))


def start_order_errors(change=lambda services: None):
    compose = yaml.safe_load(yaml.safe_dump(COMPOSE))
    change(compose["services"])
    with repository({"Cargo.toml": "[workspace]\n", "deploy/Dockerfile": "FROM scratch\n",
                     "deploy/compose.yaml": [compose]}):
        r = Report(io.StringIO())
        check_start_order("deploy/compose.yaml", r)
        return r.errors


class StartOrder(unittest.TestCase):
    def test_repository_compose_passes(self):
        self.assertEqual(start_order_errors(), [])

    def test_each_broken_setting_fails(self):
        cases = {
            "no postgres": lambda s: s.pop("postgres"),
            "no healthcheck": lambda s: s["postgres"].pop("healthcheck"),
            "server before its migration": lambda s: s["memory-service"].pop("depends_on"),
            "migration before postgres is healthy": lambda s: s["booking-migrate"].pop("depends_on"),
            "migration restarts": lambda s: s["memory-migrate"].update(restart="always"),
            "serving pod migrates": lambda s: s["booking-service"]["environment"].pop("SKIP_MIGRATIONS"),
            "wrong command": lambda s: s["memory-service"].update(command=["memory-service", "migrate"]),
            "no DATABASE_URL": lambda s: s["booking-migrate"]["environment"].pop("DATABASE_URL"),
            "text logs": lambda s: s["memory-service"]["environment"].update(LOG_FORMAT="text"),
            "memory-service unknown to booking": lambda s: s["booking-service"]["environment"].update(
                BOOKING_MEMORY_URL="http://elsewhere:50051"),
            "port not published": lambda s: s["booking-service"].update(ports=[]),
            "build context elsewhere": lambda s: s["memory-service"].update(build={"context": "."}),
        }
        for what, change in cases.items():
            with self.subTest(what):
                self.assertTrue(start_order_errors(change))


if __name__ == "__main__":
    unittest.main()
