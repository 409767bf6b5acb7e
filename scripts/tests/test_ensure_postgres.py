"""Tests of scripts/ensure_postgres.py's pure parts:
python3 -m unittest discover -s scripts/tests -t scripts"""
import os
import tempfile
import unittest

from ensure_postgres import add_statement_stats, admin_url, choose_cluster, newest, parse_lsclusters, trust_loopback, url_host_port

DEBIAN_HBA = """\
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             postgres                                peer
local   all             all                                     peer
# IPv4 local connections:
host    all             all             127.0.0.1/32            scram-sha-256
# IPv6 local connections:
host    all             all             ::1/128                 scram-sha-256
host    all             all             10.0.0.0/8              scram-sha-256
local   replication     all                                     peer
host    replication     all             127.0.0.1/32            scram-sha-256
"""


class Choosing(unittest.TestCase):
    def test_newest_version_orders_numbers_not_text(self):
        self.assertEqual(newest(["9.6", "15", "16", "13"]), "16")
        self.assertEqual(newest(["15", "README"]), "15")
        self.assertIsNone(newest([]))

    def test_cluster_main_else_first(self):
        self.assertEqual(choose_cluster(["test", "main"]), "main")
        self.assertEqual(choose_cluster(["zeta", "beta"]), "beta")
        self.assertIsNone(choose_cluster([]))

    def test_lsclusters(self):
        text = ("15  main    5432 online postgres /var/lib/postgresql/15/main /var/log/postgresql/postgresql-15-main.log\n"
                "16  other   5433 down   postgres /var/lib/postgresql/16/other /var/log/x.log\n")
        self.assertEqual(parse_lsclusters(text), [("15", "main", 5432, "online"), ("16", "other", 5433, "down")])
        self.assertEqual(parse_lsclusters("Ver Cluster Port Status Owner\n"), [])


class PgHba(unittest.TestCase):
    def test_loopback_lines_become_trust(self):
        out = trust_loopback(DEBIAN_HBA).splitlines()
        self.assertIn("host    all             all             127.0.0.1/32            trust", out)
        self.assertIn("host    all             all             ::1/128                 trust", out)
        self.assertIn("host    replication     all             127.0.0.1/32            trust", out)
        # Other addresses and local lines are left alone; nothing is added.
        self.assertIn("host    all             all             10.0.0.0/8              scram-sha-256", out)
        self.assertIn("local   all             postgres                                peer", out)
        self.assertEqual(len(out), len(DEBIAN_HBA.splitlines()))

    def test_missing_loopback_lines_are_added_first(self):
        out = trust_loopback("local all all peer\n").splitlines()
        self.assertTrue(out[0].startswith("host    all    all    127.0.0.1/32    trust"))
        self.assertTrue(out[1].startswith("host    all    all    ::1/128         trust"))
        self.assertEqual(out[2], "local all all peer")

    def test_idempotent(self):
        once = trust_loopback(DEBIAN_HBA)
        self.assertEqual(trust_loopback(once), once)


class Urls(unittest.TestCase):
    def test_admin_url(self):
        self.assertEqual(admin_url(55432), "postgres://postgres@127.0.0.1:55432/postgres")

    def test_host_and_port(self):
        self.assertEqual(url_host_port("postgres://postgres@127.0.0.1:5433/postgres"), ("127.0.0.1", 5433))
        self.assertEqual(url_host_port("postgresql://u:p@db.example/x?sslmode=require"), ("db.example", 5432))
        self.assertEqual(url_host_port("postgres://[::1]:6000/x"), ("::1", 6000))
        self.assertIsNone(url_host_port("mysql://x"))


if __name__ == "__main__":
    unittest.main()


class StatementStats(unittest.TestCase):
    def test_preload_is_written_once(self):
        with tempfile.TemporaryDirectory() as d:
            conf = os.path.join(d, "postgresql.conf")
            with open(conf, "w") as f:
                f.write("max_connections = 100\n")
            self.assertTrue(add_statement_stats(conf))
            self.assertFalse(add_statement_stats(conf))
            with open(conf) as f:
                text = f.read()
            self.assertEqual(text.count("shared_preload_libraries = 'pg_stat_statements'"), 1)
            self.assertTrue(text.startswith("max_connections = 100\n"))
