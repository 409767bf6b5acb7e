import io
import os
import tempfile
import unittest

import yaml

from deploycheck.budget import SUPERUSER_RESERVED, check_claim_line, check_readme, compute_budget, owning_kustomization
from deploycheck.common import Report, documented_defaults, pool_default, render
from deploycheck.tests.fixtures import DEFAULTS, cm, deployment, hpa

JOB = {"kind": "Job", "metadata": {"name": "m"}, "spec": {"template": {"spec": {"containers": [
    {"name": "migrate", "command": ["memory-service"], "args": ["migrate"]}]}}}}
DOCS = [deployment("memory-service", "memory-service", "mc"), hpa("memory-service", 6),
        deployment("booking-service", "booking-service", "bc"), hpa("booking-service", 4),
        cm("mc", DB_MAX_CONNECTIONS="16"), cm("bc", DB_MAX_CONNECTIONS="20"), JOB,
        dict(JOB, metadata={"name": "b"})]
# A percentage surge rounds up; Recreate has none; an env entry beats the ConfigMap; workers off.
DOCS2 = [deployment("memory-service", "memory-service", "mc", surge="25%",
                    env=[{"name": "DB_MAX_CONNECTIONS", "value": "10"}]), hpa("memory-service", 6),
         deployment("booking-service", "booking-service", "bc", strategy={"type": "Recreate"}),
         cm("mc", DB_MAX_CONNECTIONS="16"), cm("bc", BOOKING_DISABLE_WORKERS="true")]
README = ("# x\n### Connection budget\n`DB_MAX_CONNECTIONS` (default 16)\n\n"
          "- memory-service: `DB_MAX_CONNECTIONS` + 1\n  = 17\n"
          "- booking-service: `DB_MAX_CONNECTIONS` (default 20) +\n"
          "  `BOOKING_WORKER_DB_MAX_CONNECTIONS` (default 12) + 1 = 33\n\n"
          "| manifests | pods | max | rollout | max_connections |\n|---|---|---|---|---|\n"
          "| `deploy/k8s/base` | 6 memory-service + 4 booking-service | 234 | 284 | ≥ 313 |\n## next\n")


def budget(docs):
    report = Report(io.StringIO())
    b = compute_budget(docs, DEFAULTS, report)
    assert not report.errors, report.errors
    return b


class ComputeBudget(unittest.TestCase):
    def test_pool_default(self):
        self.assertEqual(pool_default(DEFAULTS["memory-service"], "DB_MAX_CONNECTIONS"), 16)
        self.assertEqual(pool_default(DEFAULTS["booking-service"], "BOOKING_WORKER_DB_MAX_CONNECTIONS"), 12)
        self.assertIsNone(pool_default(DEFAULTS["booking-service"], "NOPE"))
        self.assertIsNone(pool_default(DEFAULTS["booking-service"], "BOOKING_MEMORY_URL"))

    def test_documented_defaults_read_the_readme_tables(self):
        with tempfile.TemporaryDirectory() as root:
            with open(os.path.join(root, "README.md"), "w") as f:
                f.write("## Configuration\n\n### Both services\n\n| variable | m | b | meaning |\n|---|---|---|---|\n"
                        "| `DB_MAX_CONNECTIONS` | `16` | `20` | pool |\n\n### booking-service\n\n"
                        "| variable | default | meaning |\n|---|---|---|\n| `BOOKING_WORKER_DB_MAX_CONNECTIONS` | `12` | x |\n"
                        "\n## Errors\n\n| `NOT_A_SETTING` | `1` | x |\n")
            found = documented_defaults(root)
        self.assertEqual(found["memory-service"], {"DB_MAX_CONNECTIONS": "16"})
        self.assertEqual(found["booking-service"], {"DB_MAX_CONNECTIONS": "20", "BOOKING_WORKER_DB_MAX_CONNECTIONS": "12"})

    def test_hpa_maxima_and_rollout(self):
        b = budget(DOCS)
        # booking: 20 + the code's default 12 (not in the ConfigMap) + 1.
        self.assertEqual([p["per_pod"] for p in b["pods"]], [33, 17])
        self.assertEqual((b["steady"], b["rollout"], b["jobs"], b["recommended"]), (234, 284, 4, 313))

    def test_surge_strategy_env_and_disabled_workers(self):
        b = budget(DOCS2)
        self.assertEqual([(p["per_pod"], p["replicas"], p["surge"]) for p in b["pods"]], [(21, 1, 0), (11, 6, 2)])
        self.assertEqual((b["steady"], b["rollout"]), (6 * 11 + 21, 8 * 11 + 21))
        self.assertEqual(budget([cm("x")])["recommended"], SUPERUSER_RESERVED)

    def test_pool_size_not_a_number_fails(self):
        report = Report(io.StringIO())
        compute_budget(DOCS[:4] + [cm("mc", DB_MAX_CONNECTIONS="many"), cm("bc")], DEFAULTS, report)
        self.assertTrue(report.errors)


class Claims(unittest.TestCase):
    def claims(self, *lines):
        r = Report(io.StringIO())
        kinds = {check_claim_line(t, budget(DOCS), "t", r) for t in lines}
        return kinds, r.errors

    def test_true_figures_pass(self):
        kinds, errors = self.claims(
            "per memory-service pod: DB_MAX_CONNECTIONS 16 + readiness 1 = 17",
            "per booking-service pod: DB_MAX_CONNECTIONS (20) + BOOKING_WORKER_DB_MAX_CONNECTIONS (12) + readiness (1) = 33",
            "at the HPA maxima: memory-service 6 x 17 + booking-service 4 x 33 = 234 connections",
            "during a rollout (maxSurge 1 each): memory-service 7 x 17 + booking-service 5 x 33 = 284",
            "PostgreSQL max_connections >= 313 (+10%)", "no figure here")
        self.assertEqual(errors, [])
        self.assertLessEqual({"per pod", "steady", "rollout", "max_connections"}, kinds)

    def test_wrong_or_unreadable_figures_fail(self):
        for bad in ("at the HPA maxima: memory-service 6 x 16 + booking-service 4 x 32 = 224",
                    "per booking-service pod: DB_MAX_CONNECTIONS 20 + readiness 1 = 21",
                    "during a rollout: memory-service 6 x 17 + booking-service 4 x 33 = 234",
                    "at the HPA maxima: memory-service 6 x 17 = 102",
                    "max_connections >= 100", "PostgreSQL needs 176 in total = 176", "the old figure = 176"):
            with self.subTest(bad):
                self.assertTrue(self.claims(bad)[1])


class BuiltInRendererAndReadme(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, self.tmp)

    def write(self, path, text):
        full = os.path.join(self.tmp, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
        return full

    def test_resources_component_and_patches(self):
        self.write("base/kustomization.yaml", "resources: [all.yaml]\n")
        self.write("base/all.yaml", yaml.safe_dump_all(DOCS))
        self.write("over/kustomization.yaml", "resources: [../base]\ncomponents: [comp]\npatches:\n  - path: p.yaml\n")
        self.write("over/p.yaml", "kind: HorizontalPodAutoscaler\nmetadata: {name: memory-service}\nspec: {maxReplicas: 8}\n")
        self.write("over/comp/kustomization.yaml", "kind: Component\npatches:\n  - path: q.yaml\n"
                   "  - target: {kind: Deployment}\n    patch: |-\n      - op: remove\n        path: /spec\n")
        q = self.write("over/comp/q.yaml", "kind: Deployment\nmetadata: {name: booking-service}\nspec:\n  template:\n"
                       "    spec:\n      containers:\n        - name: booking-service\n          env:\n"
                       "            - {name: BOOKING_WORKER_DB_MAX_CONNECTIONS, value: '2'}\n")
        notes = []
        r = render(os.path.join(self.tmp, "over"), notes=notes)
        b = budget(r)
        self.assertEqual([(p["replicas"], p["per_pod"]) for p in b["pods"]], [(4, 23), (8, 17)])
        self.assertTrue(notes)  # the JSON 6902 patch is reported, not applied
        self.assertTrue(r[2]["spec"]["template"]["spec"]["containers"][0]["envFrom"])
        self.assertEqual(owning_kustomization(q), os.path.join(self.tmp, "over"))

    def test_readme(self):
        path = self.write("README.md", README)
        r = Report(io.StringIO())
        check_readme(path, {"deploy/k8s/base": budget(DOCS)}, DEFAULTS, r)
        self.assertEqual(r.errors, [])
        check_readme(path, {"deploy/k8s/base": budget(DOCS2)}, DEFAULTS, r)
        self.assertEqual(len(r.errors), 4, r.errors)

    def test_readme_default_belongs_to_its_bullets_service(self):
        # 16 is memory-service's default, not booking-service's.
        path = self.write("README.md", README.replace("(default 20)", "(default 16)"))
        r = Report(io.StringIO())
        check_readme(path, {"deploy/k8s/base": budget(DOCS)}, DEFAULTS, r)
        self.assertEqual(len(r.errors), 1, r.errors)
        self.assertIn("defaults to 16, the code says 20", r.errors[0])


if __name__ == "__main__":
    unittest.main()
