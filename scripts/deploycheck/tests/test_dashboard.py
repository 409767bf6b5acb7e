import io
import json
import unittest

from deploycheck.common import Report
from deploycheck.dashboard import check_dashboards
from deploycheck.tests.fixtures import repository, repository_file

DASHBOARD = "deploy/grafana/maitre-dashboard.json"


def dashboard_errors(change=lambda d: None, text=None):
    d = json.loads(repository_file(DASHBOARD))
    change(d)
    with repository({DASHBOARD: text if text is not None else json.dumps(d)}):
        r = Report(io.StringIO())
        check_dashboards(None, r)
        return r.errors


def first_target(d):
    return next(p for p in d["panels"] if p["type"] != "row")["targets"][0]


class Dashboard(unittest.TestCase):
    def test_repository_dashboard_passes(self):
        self.assertEqual(dashboard_errors(), [])

    def test_each_broken_dashboard_fails(self):
        cases = {
            "not JSON": dict(text="{"),
            "no uid": dict(change=lambda d: d.pop("uid")),
            "no datasource variable": dict(change=lambda d: d["templating"].update(list=[])),
            "panel id twice": dict(change=lambda d: d["panels"].append(dict(d["panels"][-1]))),
            "PromQL does not parse": dict(change=lambda d: first_target(d).update(expr="sum(rate(x[5m])")),
            "fixed datasource": dict(change=lambda d: first_target(d).update(datasource={"uid": "prom"})),
        }
        for what, kw in cases.items():
            with self.subTest(what):
                self.assertTrue(dashboard_errors(**kw))


if __name__ == "__main__":
    unittest.main()
