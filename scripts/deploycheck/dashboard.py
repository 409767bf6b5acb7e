"""deploy/grafana/*.json: valid JSON, the datasource variable, unique panel
ids, every PromQL expression parses (promql-parser)."""
import glob
import json
import re

import promql_parser


def check_dashboards(ctx, report):
    for path in sorted(glob.glob("deploy/grafana/*.json")):
        try:
            with open(path) as f:
                json.load(f)
        except ValueError as e:
            report.error(f"{path}: not valid JSON: {e}")
            continue
        report.info(f"{path}: valid JSON")
        check_panels(path, report)


def check_panels(path, report):
    """The datasource variable, unique panel ids, and every PromQL expression
    parses (Grafana's variables replaced by concrete values first)."""
    with open(path) as f:
        d = json.load(f)
    for k in ("uid", "title", "schemaVersion", "panels", "templating"):
        if k not in d:
            report.error(f"no top-level {k}")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        report.error("templating needs a datasource variable DS_PROMETHEUS of type prometheus")
    ids = set()
    n_expr = 0
    flat = []
    for p in d.get("panels", []):
        flat.append(p)
        flat += p.get("panels", []) or []
    for p in flat:
        if p["id"] in ids:
            report.error(f"panel id {p['id']} used twice")
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        for k in ("gridPos", "title", "targets"):
            if k not in p:
                report.error(f"panel {p.get('title', p['id'])}: no {k}")
        if (p.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
            report.error(f"panel {p['title']}: datasource should be ${{DS_PROMETHEUS}}")
        for t in p.get("targets", []):
            if (t.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
                report.error(f"panel {p['title']} target {t.get('refId')}: datasource should be ${{DS_PROMETHEUS}}")
            expr = t.get("expr", "")
            concrete = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            concrete = re.sub(r"\$\{?(\w+)\}?", ".*", concrete)
            try:
                promql_parser.parse(concrete)
            except Exception as e:
                report.error(f"panel {p['title']} target {t.get('refId')}: PromQL does not parse: {e}: {expr}")
            n_expr += 1
    report.info(f"{len(flat)} panels, {n_expr} PromQL expressions parse, schemaVersion {d.get('schemaVersion')}")
