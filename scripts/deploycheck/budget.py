"""The PostgreSQL connection budget: the most PostgreSQL connections each
  render's pods can open (LABEL = a kustomization directory), and every figure stated about it: the lines of each "Connection budget" comment
  block under LABEL (base: deploy/k8s/base/configmaps.yaml; overlay:
  patch-autoscaling.yaml), any comment line there stating
  `max_connections >= N`, and README.md's "Connection budget" section (the
  per-pod bullets with the code's defaults, one table row per LABEL) must
  match the computed figures, or the check fails and prints them. Each
  LABEL must state its totals at the HPA maxima and during a rollout.

    per pod: memory-service   DB_MAX_CONNECTIONS + 1
             booking-service  DB_MAX_CONNECTIONS + BOOKING_WORKER_DB_MAX_CONNECTIONS + 1
  The +1 is the readiness check's own connection. booking-service's workers
  hold one LISTEN connection for job wake-ups, taken from the worker pool
  (PgListener::connect_with(pool)), so it is inside
  BOOKING_WORKER_DB_MAX_CONNECTIONS, not on top; the wake-up NOTIFYs use the
  API pool. (Behind a transaction-mode pooler, DB_POOLER=transaction, the
  LISTEN moves to DATABASE_DIRECT_URL and the pools' connections go to the
  pooler: README.md's "Behind PgBouncer" counts that case; the manifests
  here use no pooler.) With BOOKING_DISABLE_WORKERS the
  worker pool opens nothing. Pool sizes come from the container's env and
  ConfigMaps, else from README.md's configuration tables (kept equal to the code by tests/config) for the
  service's Rust code.
    pods: the HPA's maxReplicas (else spec.replicas); during a rollout
          maxSurge more (RollingUpdate; 25% when unset; 0 for Recreate)
    at the HPA maxima = sum of pods x per pod; during a rollout = sum of
          (pods + surge) x per pod
    max_connections >= the larger of rollout + 10% and rollout + the
          migration Jobs (2 each) + superuser_reserved_connections (3)

  Comment lines recognised inside a block (a comment line containing
  "Connection budget" and the comment lines right after it); any other line
  there that ends in "= <number>" is an error, so no figure goes unchecked:
    per <deployment> pod: NAME 16 + NAME 12 + readiness 1 = 29
    at the HPA maxima: <deployment> 6 x 17 + <deployment> 4 x 33 = 234
    during a rollout ...: <deployment> 7 x 17 + <deployment> 5 x 33 = 284
    ... max_connections >= 313 ...
"""
import glob
import io
import math
import os
import re

from .common import SERVICES, Report, effective_env, kustomization_of, load_render, objects, read_text, render, pool_default, documented_defaults, \
    service_containers, truthy

# A pool that a setting switches off.
POOL_OFF = {"BOOKING_WORKER_DB_MAX_CONNECTIONS": "BOOKING_DISABLE_WORKERS"}
READINESS_PER_POD = 1  # the health check's own connection, outside the pools
MIGRATION_PER_JOB = 2  # `migrate`: the database-exists check, then the migrations
SUPERUSER_RESERVED = 3  # PostgreSQL's default superuser_reserved_connections
HEADROOM = 0.10


def compute_budget(docs, defaults, report):
    """{'pods': [...], 'steady', 'rollout', 'jobs', 'recommended'} for one render."""
    cms = objects(docs, "ConfigMap")
    hpas = list(objects(docs, "HorizontalPodAutoscaler").values())
    pods = []
    for w, c, service in service_containers(docs):
        name = w["metadata"]["name"]
        env = effective_env(c, cms)
        pools = {}
        for var in SERVICES[service]["pools"]:
            if var in POOL_OFF and truthy(env.get(POOL_OFF[var], "false")):
                pools[var] = 0
                continue
            raw = env.get(var)
            if raw is None:
                raw = pool_default(defaults[service], var)
                if raw is None:
                    report.error(f"{name}: {var} is not set and no default for it is documented for {service} in README.md's configuration tables")
                    raw = 0
            try:
                pools[var] = int(str(raw).strip())
            except ValueError:
                report.error(f"{name}: {var}={raw!r} is not a number")
                pools[var] = 0
        maxima = [h["spec"]["maxReplicas"] for h in hpas
                  if h["spec"]["scaleTargetRef"].get("kind") == "Deployment" and h["spec"]["scaleTargetRef"]["name"] == name]
        replicas = max(maxima) if maxima else int(w["spec"].get("replicas", 1))
        strategy = w["spec"].get("strategy") or {}
        if strategy.get("type") == "Recreate":
            surge = 0
        else:
            s = (strategy.get("rollingUpdate") or {}).get("maxSurge", "25%")
            surge = math.ceil(replicas * int(s[:-1]) / 100) if isinstance(s, str) and s.endswith("%") else int(s)
        pods.append({"name": name, "service": service, "pools": pools, "per_pod": sum(pools.values()) + READINESS_PER_POD,
                     "replicas": replicas, "surge": surge})
    pods.sort(key=lambda p: p["name"])
    steady = sum(p["replicas"] * p["per_pod"] for p in pods)
    rollout = sum((p["replicas"] + p["surge"]) * p["per_pod"] for p in pods)
    jobs = sum(1 for _ in service_containers(docs, "Job", ("migrate",))) * MIGRATION_PER_JOB
    recommended = max(math.ceil(round(rollout * (1 + HEADROOM), 6)), rollout + jobs + SUPERUSER_RESERVED)
    return {"pods": pods, "steady": steady, "rollout": rollout, "jobs": jobs, "recommended": recommended}


def describe(b):
    lines = []
    for p in b["pods"]:
        formula = " + ".join(f"{k} {v}" for k, v in p["pools"].items()) + f" + readiness {READINESS_PER_POD}"
        lines.append(f"{p['name']}: {p['replicas']} pods (+{p['surge']} surge) x {p['per_pod']} ({formula})")
    lines.append(f"at the HPA maxima {b['steady']}, during a rollout {b['rollout']}, migration Jobs {b['jobs']} (briefly); "
                 f"PostgreSQL max_connections >= {b['recommended']}")
    return lines


MAX_CONNECTIONS_CLAIM = re.compile(r"max_connections\s*(?:>=|≥|of at least|at least)\s*(\d+)")
FIGURE = re.compile(r"=\s*(\d+)(?:\s+connections?)?\s*[.,;:)]?\s*$")
PRODUCT = re.compile(r"\b([a-z][a-z0-9-]*)\s+(\d+)\s*[x×*]\s*(\d+)")


def check_claim_line(text, b, where, report):
    """Checks one comment line of a budget block; returns what it stated (or None)."""
    pods = {p["name"]: p for p in b["pods"]}
    low = text.lower()
    m = MAX_CONNECTIONS_CLAIM.search(text)
    if m:
        if int(m.group(1)) != b["recommended"]:
            report.error(f"{where}: says max_connections >= {m.group(1)}, computed {b['recommended']}")
        return "max_connections"
    fig = FIGURE.search(text)
    if not fig:
        if re.search(r"=\s*\d", text):
            report.error(f"{where}: a figure the budget check cannot read ({text.strip()!r}): end the line with `= <number>`")
            return "unknown"
        return None
    stated = int(fig.group(1))
    per_pod = re.search(r"\bper\s+([a-z][a-z0-9-]*)\s+pod\b", text)
    if per_pod:
        p = pods.get(per_pod.group(1))
        if p is None:
            report.error(f"{where}: no Deployment {per_pod.group(1)} in this render")
            return "per pod"
        for var, n in re.findall(r"\b([A-Z][A-Z0-9_]*_CONNECTIONS)\s*\(?\s*(\d+)", text):
            if var not in p["pools"]:
                report.error(f"{where}: {var} is not a pool of {p['name']}")
            elif int(n) != p["pools"][var]:
                report.error(f"{where}: says {var} {n}, the render has {p['pools'][var]}")
        missing = [v for v in p["pools"] if v not in text]
        if missing:
            report.error(f"{where}: the per-pod formula of {p['name']} leaves out {', '.join(missing)}")
        r = re.search(r"readiness\s*\(?\s*(\d+)", text)
        if not r or int(r.group(1)) != READINESS_PER_POD:
            report.error(f"{where}: the per-pod formula should count the readiness connection: + readiness {READINESS_PER_POD}")
        if stated != p["per_pod"]:
            report.error(f"{where}: says {stated} per {p['name']} pod, computed {p['per_pod']}")
        return "per pod"
    if "hpa max" in low or "rollout" in low or "surge" in low:
        rolling = "rollout" in low or "surge" in low
        kind = "rollout" if rolling else "steady"
        seen = set()
        for name, n, per in PRODUCT.findall(text):
            p = pods.get(name)
            if p is None:
                report.error(f"{where}: no Deployment {name} in this render")
                continue
            seen.add(name)
            want = p["replicas"] + (p["surge"] if rolling else 0)
            if int(n) != want:
                report.error(f"{where}: says {n} {name} pods, computed {want}"
                             + (f" ({p['replicas']} + maxSurge {p['surge']})" if rolling else " (HPA maxReplicas)"))
            if int(per) != p["per_pod"]:
                report.error(f"{where}: says {per} connections per {name} pod, computed {p['per_pod']}")
        for name in pods:
            if name not in seen:
                report.error(f"{where}: the total leaves out {name} (write `{name} <pods> x <per pod>`)")
        if stated != b[kind]:
            report.error(f"{where}: says {stated} {'during a rollout' if rolling else 'at the HPA maxima'}, computed {b[kind]}")
        return kind
    report.error(f"{where}: a figure the budget check does not know ({text.strip()!r}): "
                 "write it as one of the forms in scripts/deploycheck/budget.py")
    return "unknown"


def budget_blocks(path):
    """(line number, text) of each line of the "Connection budget" comment
    blocks in a YAML file, and of any other comment line stating a
    max_connections figure."""
    out, inside = [], False
    with open(path) as f:
        for i, line in enumerate(f, 1):
            s = line.strip()
            if not s.startswith("#"):
                inside = False
                continue
            if "connection budget" in s.lower():
                inside = True
            if inside or MAX_CONNECTIONS_CLAIM.search(s):
                out.append((i, s.lstrip("#").strip()))
    return out


def owning_kustomization(path):
    d = os.path.dirname(os.path.normpath(path))
    while d and d != os.path.dirname(d):
        k = kustomization_of(d)
        if k is not None and k.get("kind", "Kustomization") == "Kustomization":
            return d
        d = os.path.dirname(d)
    return None


def readme_section(path, title="Connection budget"):
    if not os.path.isfile(path):
        return None
    lines = read_text(path).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+" + re.escape(title) + r"\s*$", line)
        if m:
            level, out = len(m.group(1)), []
            for j in range(i + 1, len(lines)):
                h = re.match(r"^(#+)\s", lines[j])
                if h and len(h.group(1)) <= level:
                    break
                out.append((j + 1, lines[j]))
            return out
    return None


def check_readme(path, budgets, defaults, report):
    section = readme_section(path)
    if section is None:
        report.error(f"{path}: no \"Connection budget\" section")
        return
    # A stated default belongs to the service of the bullet it is in
    # ("- booking-service: `DB_MAX_CONNECTIONS` (default 20) ..."): both
    # services read DB_MAX_CONNECTIONS, with defaults of their own.
    service_of_line = None
    for n, line in section:
        bullet = re.match(r"- ([a-z][a-z0-9-]*):", line)
        if bullet or not line.strip():
            service_of_line = bullet.group(1) if bullet and bullet.group(1) in SERVICES else None
        for var, default in re.findall(r"`?([A-Z][A-Z0-9_]*_CONNECTIONS)`?\s*\(default\s+(\d+)\b", line):
            readers = [service_of_line] if service_of_line else [s for s, v in SERVICES.items() if var in v["pools"]]
            code = {pool_default(defaults[s], var) for s in readers if var in SERVICES[s]["pools"]} - {None}
            if not code:
                report.error(f"{path}:{n}: {var} is not a pool size the code reads")
            elif int(default) not in code:
                report.error(f"{path}:{n}: says {var} defaults to {default}, the code says {' or '.join(map(str, sorted(code)))}")
    # The per-pod bullets ("- memory-service: ... = 17") count the defaults.
    for bullet in re.split(r"\n(?=- )", "\n".join(line for _, line in section)):
        m = re.match(r"- ([a-z][a-z0-9-]*):", bullet)
        fig = FIGURE.search(bullet.strip())
        if m and m.group(1) in SERVICES and fig:
            pools = SERVICES[m.group(1)]["pools"]
            want = sum(pool_default(defaults[m.group(1)], v) or 0 for v in pools) + READINESS_PER_POD
            if int(fig.group(1)) != want or any(v not in bullet for v in pools):
                report.error(f"{path}: per {m.group(1)} pod with the defaults: " + " + ".join(pools)
                             + f" + readiness = {want}, the bullet says {fig.group(1)}")
    rows = {}
    for n, line in section:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        m = re.search(r"`([^`]+)`", cells[0]) if cells else None
        if m and m.group(1).rstrip("/") in budgets:
            rows[m.group(1).rstrip("/")] = (n, cells)
    for label, b in budgets.items():
        if label not in rows:
            report.error(f"{path}: the \"Connection budget\" table has no row for `{label}`")
            continue
        n, cells = rows[label]
        where = f"{path}:{n}"
        if len(cells) != 5:
            report.error(f"{where}: expected 5 cells (manifests | pods at the HPA maxima | at the HPA maxima | "
                         f"during a rollout | max_connections), got {len(cells)}")
            continue
        pods = {p["name"]: p for p in b["pods"]}
        stated = {name: int(k) for k, name in re.findall(r"(\d+)\s+([a-z][a-z0-9-]*)", cells[1])}
        if stated != {k: p["replicas"] for k, p in pods.items()}:
            report.error(f"{where}: pods {cells[1]!r}, computed "
                         + " + ".join(f"{p['replicas']} {k}" for k, p in pods.items()))
        for cell, key, what in ((cells[2], "steady", "at the HPA maxima"), (cells[3], "rollout", "during a rollout"),
                                (cells[4], "recommended", "max_connections")):
            nums = re.findall(r"\d+", cell)
            if not nums or int(nums[0]) != b[key]:
                report.error(f"{where}: {what} {cell!r}, computed {b[key]}")


def check_budget(renders, report, root=".", readme="README.md"):
    """renders: [(LABEL, kustomize's output file or the kustomization directory)]."""
    defaults = documented_defaults(root)
    budgets = {}
    for label, path in renders:
        notes = []
        b = compute_budget(load_render(path, notes), defaults, report)
        report.info(f"{label}:")
        for line in describe(b):
            report.info("  " + line)
        if os.path.isfile(path) and kustomization_of(label) is not None:
            # kustomize rendered it: the built-in renderer must agree, since
            # it is what this check falls back to without kustomize.
            mine = compute_budget(render(label, notes=notes), defaults, Report(io.StringIO()))
            if mine != b:
                report.warn(f"{label}: the built-in renderer computes {describe(mine)[-1]}; kustomize's render differs")
        if kustomization_of(label) is not None:
            budgets[os.path.normpath(label)] = b
    claimed = {label: set() for label in budgets}
    for p in sorted(glob.glob(os.path.join(root, "deploy/k8s/**/*.yaml"), recursive=True)):
        p = os.path.normpath(p)
        block = budget_blocks(p)
        if not block:
            continue
        owner = owning_kustomization(os.path.relpath(p, root))
        if owner not in budgets:
            report.error(f"{p}: a connection budget comment for {owner}, which is not rendered here")
            continue
        for n, text in block:
            kind = check_claim_line(text, budgets[owner], f"{os.path.relpath(p, root)}:{n}", report)
            if kind:
                claimed[owner].add(kind)
    for label, kinds in claimed.items():
        for kind, what in (("steady", "at the HPA maxima"), ("rollout", "during a rollout")):
            if kind not in kinds:
                report.error(f"{label}: no connection budget comment states the total {what} "
                             f"(computed {budgets[label][kind]})")
    check_readme(os.path.normpath(os.path.join(root, readme)), budgets, defaults, report)
    if not report.errors:
        report.info(f"every stated figure matches ({', '.join(sorted(budgets))}, {readme})")

