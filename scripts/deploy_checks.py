#!/usr/bin/env python3
"""Checks of deploy/ that need arithmetic or the Rust code, run by
scripts/validate-deploy.sh (which cds to the repository root and puts PyYAML
on the path):

  deploy_checks.py budget --render LABEL=PATH [--render LABEL=PATH ...]
  deploy_checks.py auth   --render LABEL=PATH [--render LABEL=PATH ...]
  deploy_checks.py --self-test

PATH is kustomize's output (a YAML file) or a kustomization directory, which
this script then renders itself: resources, components and strategic-merge
patches, enough for these checks but not a kustomize (JSON 6902 patches,
generators, images and namespaces are ignored). LABEL is the kustomization's
directory (deploy/k8s/base, deploy/k8s/overlays/example) or any other name
for a render that no comment describes (example+mtls).

budget: the most PostgreSQL connections each render's pods can open, and
  every figure stated about it: the lines of each "Connection budget" comment
  block under LABEL (base: deploy/k8s/base/configmaps.yaml; overlay:
  patch-autoscaling.yaml), any comment line there stating
  `max_connections >= N`, and README.md's "Connection budget" section (the
  per-pod bullets with the code's defaults, one table row per LABEL) must
  match the computed figures, or the check fails and prints them. Each
  LABEL must state its totals at the HPA maxima and during a rollout.

    per pod: memory-service   DB_MAX_CONNECTIONS + 1
             booking-service  DB_MAX_CONNECTIONS + BOOKING_WORKER_DB_MAX_CONNECTIONS + 1
  The +1 is the readiness check's own connection. booking-service's two
  queues (plan, deliver) each hold a LISTEN connection, but apalis takes it
  from the worker pool (PgListener::connect_with(pool)), so it is inside
  BOOKING_WORKER_DB_MAX_CONNECTIONS, not on top. With BOOKING_DISABLE_WORKERS the
  worker pool opens nothing. Pool sizes come from the container's env and
  ConfigMaps, else from the `default_value_t` next to `env = "NAME"` in the
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

auth: fail-closed authentication and least-privilege grants.
  - no ConfigMap (in any YAML file under deploy/k8s, patches included, nor in
    any render) and no container env sets AUTH_MODE=none;
  - every serving container has credentials (AUTH_TOKENS_FILE, AUTH_TOKENS
    or TLS_CLIENT_CA_FILE: AUTH_MODE=required refuses to start without) and
    an explicit AUTH_GRANTS whose patterns name methods of its own service
    (read from proto/), as the services check at start;
  - every *_FILE variable points into a mounted volume that provides it;
  - booking-service's TLS towards memory-service is consistent (https://,
    CA with a client certificate);
  - token files (Secrets in the render): `name:token` lines, names granted,
    tokens unique and >= 16 characters; placeholders in Secrets annotated
    maitre.io/example (the services refuse them: good) and nowhere else;
    booking-service's memory-service-token equals memory-service's
    `booking-service:` token;
  - memory-service grants `booking-service` every MemoryService method that
    booking-service's code calls;
  - deploy/compose.yaml: a service with AUTH_MODE=none publishes its ports
    on loopback only; any other has credentials.

Exit status: 0 ok, 1 errors, 78 warnings only.
"""
import glob
import io
import math
import os
import re
import sys

import yaml

SERVICES = {
    "memory-service": {
        "pools": ("DB_MAX_CONNECTIONS",),
        "code": ("memory-service/src", "runtime/src"),
        "proto": "proto/maitre/memory",
    },
    "booking-service": {
        "pools": ("DB_MAX_CONNECTIONS", "BOOKING_WORKER_DB_MAX_CONNECTIONS"),
        "code": ("booking-service/src", "runtime/src"),
        "proto": "proto/maitre/booking",
    },
}
# A pool that a setting switches off.
POOL_OFF = {"BOOKING_WORKER_DB_MAX_CONNECTIONS": "BOOKING_DISABLE_WORKERS"}
READINESS_PER_POD = 1  # the health check's own connection, outside the pools
MIGRATION_PER_JOB = 2  # `migrate`: the database-exists check, then the migrations
SUPERUSER_RESERVED = 3  # PostgreSQL's default superuser_reserved_connections
HEADROOM = 0.10
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
PLACEHOLDER_MARKS = ("change-me", "changeme", "change_me", "replace-me", "placeholder", "example", "xxxxxxxx")
MIN_TOKEN_LEN = 16
CALLER_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")
# The name memory-service's grants and token list know booking-service by
# (its token's name, its client certificate's DNS SubjectAltName).
BOOKING_CALLER = "booking-service"


class Report:
    def __init__(self, out=sys.stdout):
        self.errors, self.warnings, self.out = [], [], out

    def error(self, msg):
        self.errors.append(msg)
        print("  error: " + msg, file=self.out)

    def warn(self, msg):
        self.warnings.append(msg)
        print("  warning: " + msg, file=self.out)

    def info(self, msg):
        print("  " + msg, file=self.out)

    def status(self):
        return 1 if self.errors else 78 if self.warnings else 0


# ------------------------------------------------------------------ loading
def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


def kustomization_of(d):
    for n in KUSTOMIZATION_FILES:
        p = os.path.join(d, n)
        if os.path.isfile(p):
            return load_docs(p)[0]
    return None


def merge(base, patch):
    """Strategic merge as kustomize does it for what deploy/ uses: maps merge
    (null deletes), lists of named maps (containers, env, volumes) merge by
    name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out = list(base)
        for x in patch:
            i = next((i for i, y in enumerate(out) if y["name"] == x["name"]), None)
            if i is None:
                out.append(x)
            else:
                out[i] = merge(out[i], x)
        return out
    return patch


def render(d, docs=None, notes=None):
    """The objects the kustomization (or component) in directory d adds to docs."""
    k = kustomization_of(d)
    if k is None:
        raise SystemExit(f"{d}: no kustomization")
    docs = [] if docs is None else docs
    for r in k.get("resources") or []:
        p = os.path.normpath(os.path.join(d, r))
        docs = render(p, docs, notes) if os.path.isdir(p) else docs + load_docs(p)
    for c in k.get("components") or []:
        docs = render(os.path.normpath(os.path.join(d, c)), docs, notes)
    patches = list(k.get("patches") or []) + [{"path": p} for p in k.get("patchesStrategicMerge") or []]
    for pt in patches:
        bodies = load_docs(os.path.join(d, pt["path"])) if "path" in pt else list(yaml.safe_load_all(pt.get("patch", "")))
        for body in bodies:
            if not isinstance(body, dict):
                if notes is not None:
                    notes.append(f"{d}: a JSON 6902 patch is not applied here")
                continue
            kind = (pt.get("target") or {}).get("kind") or body.get("kind")
            name = (pt.get("target") or {}).get("name") or body.get("metadata", {}).get("name")
            docs = [merge(o, body) if o.get("kind") == kind and o.get("metadata", {}).get("name") == name else o for o in docs]
    return docs


def load_render(path, notes=None):
    return render(path, notes=notes) if os.path.isdir(path) else load_docs(path)


def rust_text(service, root="."):
    out = []
    for d in SERVICES[service]["code"]:
        for p in sorted(glob.glob(os.path.join(root, d, "**", "*.rs"), recursive=True)):
            with open(p, errors="replace") as f:
                out.append(f.read())
    return "\n".join(out)


def rust_default(text, name):
    """The integer default of the flag read from environment variable `name`."""
    for m in re.finditer(r'env\s*=\s*"' + re.escape(name) + '"', text):
        start = text.rfind("#[", 0, m.start())
        end = text.find(")]", m.end())
        attr = text[start if start >= 0 else m.start():end if end >= 0 else len(text)]
        d = re.search(r"default_value_t\s*=\s*(\d+)\b", attr) or re.search(r'default_value\s*=\s*"(\d+)"', attr)
        if d:
            return int(d.group(1))
    return None


def objects(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def effective_env(container, configmaps):
    """NAME -> value (None when it comes from a Secret)."""
    env = {}
    for ef in container.get("envFrom") or []:
        ref = ef.get("configMapRef")
        if ref:
            data = (configmaps.get(ref["name"]) or {}).get("data") or {}
            env.update({ef.get("prefix", "") + k: str(v) for k, v in data.items()})
    for e in container.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif ref:
            v = ((configmaps.get(ref["name"]) or {}).get("data") or {}).get(ref["key"])
            env[e["name"]] = None if v is None else str(v)
        else:
            env[e["name"]] = None
    return env


def service_containers(docs, kind="Deployment", args=("serve",)):
    """(workload, container, service) for each container running a maitre binary."""
    for w in objects(docs, kind).values():
        for c in w["spec"]["template"]["spec"].get("containers") or []:
            binary = (c.get("command") or [None])[0]
            if binary in SERVICES and tuple(c.get("args") or ()) == args:
                yield w, c, binary


def truthy(v):
    return str(v).strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------ budget
def compute_budget(docs, rust, report):
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
                raw = rust_default(rust[service], var)
                if raw is None:
                    report.error(f"{name}: {var} is not set and no default_value_t for it was found in {service}'s Rust code")
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
                 "write it as one of the forms in scripts/deploy_checks.py")
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
    lines = open(path).read().splitlines()
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


def check_readme(path, budgets, rust, report):
    section = readme_section(path)
    if section is None:
        report.error(f"{path}: no \"Connection budget\" section")
        return
    for n, line in section:
        for var, default in re.findall(r"`?([A-Z][A-Z0-9_]*_CONNECTIONS)`?\s*\(default\s+(\d+)\b", line):
            service = next((s for s, v in SERVICES.items() if var in v["pools"]), None)
            code = rust_default(rust[service], var) if service else None
            if code is None:
                report.error(f"{path}:{n}: {var} is not a pool size the code reads")
            elif code != int(default):
                report.error(f"{path}:{n}: says {var} defaults to {default}, the code says {code}")
    # The per-pod bullets ("- memory-service: ... = 17") count the defaults.
    for bullet in re.split(r"\n(?=- )", "\n".join(line for _, line in section)):
        m = re.match(r"- ([a-z][a-z0-9-]*):", bullet)
        fig = FIGURE.search(bullet.strip())
        if m and m.group(1) in SERVICES and fig:
            pools = SERVICES[m.group(1)]["pools"]
            want = sum(rust_default(rust[m.group(1)], v) or 0 for v in pools) + READINESS_PER_POD
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


def cmd_budget(renders, root=".", readme="README.md", out=sys.stdout):
    report = Report(out)
    rust = {s: rust_text(s, root) for s in SERVICES}
    budgets = {}
    for label, path in renders:
        notes = []
        b = compute_budget(load_render(path, notes), rust, report)
        report.info(f"{label}:")
        for line in describe(b):
            report.info("  " + line)
        if os.path.isfile(path) and kustomization_of(label) is not None:
            # kustomize rendered it: the built-in renderer must agree, since
            # it is what this check falls back to without kustomize.
            mine = compute_budget(render(label, notes=notes), rust, Report(io.StringIO()))
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
    check_readme(os.path.normpath(os.path.join(root, readme)), budgets, rust, report)
    if not report.errors:
        report.info(f"every stated figure matches ({', '.join(sorted(budgets))}, {readme})")
    return report.status()


# ------------------------------------------------------------------ auth
def proto_methods(service, root="."):
    """{'maitre.memory.v1.MemoryService/StoreMessage', ...} of a service's proto files."""
    out = set()
    for p in glob.glob(os.path.join(root, SERVICES[service]["proto"], "**", "*.proto"), recursive=True):
        text = re.sub(r"//[^\n]*", "", open(p).read())
        pkg = re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.M)
        for s in re.finditer(r"\bservice\s+(\w+)\s*\{(.*?)^\}", text, re.S | re.M):
            for m in re.findall(r"\brpc\s+(\w+)\s*\(", s.group(2)):
                out.add(f"{pkg.group(1) + '.' if pkg else ''}{s.group(1)}/{m}")
    return out


def parse_grants(spec, served):
    """({caller: [patterns resolved to 'pkg.Service/Method', 'pkg.Service/*' or '*']}, [problems])."""
    services = {m.split("/")[0] for m in served}
    own = sorted(services)[0] if len(services) == 1 else None
    grants, problems = {}, []

    def resolve(s):
        return next((f for f in services if f == s or f.rsplit(".", 1)[-1] == s), None)

    for entry in re.split(r"[;\n]", spec):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        if "=" not in entry:
            problems.append(f"{entry!r} is not `caller-name=Method,Method`")
            continue
        name, patterns = (x.strip() for x in entry.split("=", 1))
        if not CALLER_NAME.fullmatch(name):
            problems.append(f"caller name {name!r} must be letters, digits, '.', '-' or '_'")
        out = grants.setdefault(name, [])
        for pat in (p.strip() for p in patterns.split(",")):
            if not pat:
                continue
            if pat == "*":
                out.append("*")
                continue
            svc, _, method = pat.rpartition("/")
            full = resolve(svc) if svc else own
            if full is None:
                problems.append(f"{name}={pat}: no such service on this server")
            elif method == "*":
                out.append(f"{full}/*")
            elif f"{full}/{method}" not in served:
                problems.append(f"{name}={pat}: no such method on this server")
            else:
                out.append(f"{full}/{method}")
    return grants, problems


def allows(grants, caller, method):
    return any(p in ("*", method, method.split("/")[0] + "/*") for p in grants.get(caller, []))


def is_placeholder(token):
    return any(m in token.lower() for m in PLACEHOLDER_MARKS)


def parse_token_list(text):
    """([(name, token)], [problems]) of a token file / AUTH_TOKENS value."""
    entries, problems, seen = [], [], set()
    for i, entry in enumerate((e.strip() for e in re.split(r"[,\n]", text)), 1):
        if not entry or entry.startswith("#"):
            continue
        if ":" not in entry:
            problems.append(f"entry {entry[:4]}... is not `caller-name:token`")
            continue
        name, token = (x.strip() for x in entry.split(":", 1))
        if not CALLER_NAME.fullmatch(name):
            problems.append(f"caller name {name!r} must be letters, digits, '.', '-' or '_'")
        if len(token) < MIN_TOKEN_LEN:
            problems.append(f"the token of {name} is shorter than {MIN_TOKEN_LEN} characters")
        if token in seen:
            problems.append(f"the token of {name} is listed twice: every caller needs its own")
        seen.add(token)
        entries.append((name, token))
    if not entries:
        problems.append("no tokens (an empty or comment-only token file is a startup error)")
    return entries, problems


def mounted_file(workload, container, path, secrets, configmaps):
    """(kind, object name, key) of the volume that provides `path`, or None;
    key None when the object is not in the render (created out of band)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes") or []}
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(mp):
            continue
        rel = path[len(mp):]
        v = volumes.get(m["name"]) or {}
        for kind, src, objs, name_key in (("Secret", v.get("secret"), secrets, "secretName"),
                                          ("ConfigMap", v.get("configMap"), configmaps, "name")):
            if src is None:
                continue
            name = src[name_key]
            items = src.get("items")
            if items:
                key = next((it["key"] for it in items if it["path"] == rel), None)
                if key is None:
                    return None
            else:
                key = rel
            obj = objs.get(name)
            if obj is None:
                return (kind, name, None)
            keys = set((obj.get("data") or {})) | set((obj.get("stringData") or {}))
            return (kind, name, key) if key in keys else None
    return None


def secret_value(secrets, name, key):
    s = secrets.get(name) or {}
    if key in (s.get("stringData") or {}):
        return str(s["stringData"][key])
    if key in (s.get("data") or {}):
        import base64
        return base64.b64decode(s["data"][key]).decode(errors="replace")
    return None


def booking_calls(root="."):
    """MemoryService methods booking-service's code calls."""
    methods = {m.split("/")[1] for m in proto_methods("memory-service", root)}
    snake = {re.sub(r"(?<!^)([A-Z])", r"_\1", m).lower(): m for m in methods}
    files = glob.glob(os.path.join(root, "booking-service/src/**/*.rs"), recursive=True)
    text = "\n".join(t for t in (open(p).read() for p in sorted(files)) if "MemoryServiceClient" in t)
    return sorted({snake[s] for s in re.findall(r"\.\s*([a-z_]+)\s*\(", text) if s in snake})


def check_auth_mode_none(where, data, report):
    v = (data or {}).get("AUTH_MODE")
    if v is not None and str(v).strip().lower() == "none":
        report.error(f"{where}: sets AUTH_MODE=none (authentication off): not in deploy/k8s")


def check_render_auth(label, docs, root, report):
    cms, secrets = objects(docs, "ConfigMap"), objects(docs, "Secret")
    for name, cm in cms.items():
        check_auth_mode_none(f"{label}: ConfigMap {name}", cm.get("data"), report)
    tokens = {}  # service -> [(name, token)] when its token Secret is in the render
    grants_of = {}
    client = {}
    for w, c, service in service_containers(docs):
        where = f"{label}: Deployment {w['metadata']['name']}"
        env = effective_env(c, cms)
        # (the ConfigMaps were checked above)
        check_auth_mode_none(where, {e["name"]: e.get("value") for e in c.get("env") or []}, report)
        mode = (env.get("AUTH_MODE") or "required").strip().lower()
        if mode not in ("required", "none"):
            report.error(f"{where}: AUTH_MODE={mode!r}: required or none")
        if not any(k in env for k in ("AUTH_TOKENS_FILE", "AUTH_TOKENS", "TLS_CLIENT_CA_FILE")):
            report.error(f"{where}: no AUTH_TOKENS_FILE, AUTH_TOKENS or TLS_CLIENT_CA_FILE: "
                         "with AUTH_MODE=required the service refuses to start")
        if "TLS_CLIENT_CA_FILE" in env and "TLS_CERT_FILE" not in env:
            report.error(f"{where}: TLS_CLIENT_CA_FILE without TLS_CERT_FILE/TLS_KEY_FILE")
        served = proto_methods(service, root)
        spec = env.get("AUTH_GRANTS")
        if spec is None:
            report.error(f"{where}: no AUTH_GRANTS: set the grants table explicitly in the ConfigMap")
        else:
            grants, problems = parse_grants(spec, served)
            for p in problems:
                report.error(f"{where}: AUTH_GRANTS: {p} (a startup error)")
            grants_of[service] = grants
        for var, path in sorted(env.items()):
            if var.endswith("_FILE") and path:
                found = mounted_file(w, c, path, secrets, cms)
                if found is None:
                    report.error(f"{where}: {var}={path} is not provided by any mounted volume")
                elif var == "AUTH_TOKENS_FILE" and found[0] == "Secret" and found[2] is not None:
                    tokens[service] = (found, secret_value(secrets, found[1], found[2]))
                elif var == "BOOKING_MEMORY_TOKEN_FILE" and found[0] == "Secret" and found[2] is not None:
                    client[service] = (found, secret_value(secrets, found[1], found[2]))
        url = env.get("BOOKING_MEMORY_URL") or ""
        if service == "booking-service":
            tls = [v for v in ("BOOKING_MEMORY_CA_FILE", "BOOKING_MEMORY_CLIENT_CERT_FILE") if env.get(v)]
            if tls and not url.startswith("https://"):
                report.error(f"{where}: {' and '.join(tls)} with BOOKING_MEMORY_URL={url!r}: use https:// (a startup error)")
            if env.get("BOOKING_MEMORY_CLIENT_CERT_FILE") and not env.get("BOOKING_MEMORY_CA_FILE"):
                report.error(f"{where}: BOOKING_MEMORY_CLIENT_CERT_FILE without BOOKING_MEMORY_CA_FILE (a startup error)")
            elif url.startswith("https://") and not env.get("BOOKING_MEMORY_CA_FILE"):
                report.error(f"{where}: BOOKING_MEMORY_URL={url!r} without BOOKING_MEMORY_CA_FILE (a startup error)")
    for service, ((_, secret, key), text) in tokens.items():
        where = f"{label}: Secret {secret} key {key}"
        entries, problems = parse_token_list(text or "")
        for p in problems:
            report.error(f"{where}: {p}")
        example = "maitre.io/example" in ((secrets[secret].get("metadata") or {}).get("annotations") or {})
        for name, token in entries:
            if example and not is_placeholder(token):
                report.error(f"{where}: the token of {name} is in an example Secret but is no placeholder "
                             "(example tokens must be refused at start: CHANGE-ME-...)")
            if not example and is_placeholder(token):
                report.error(f"{where}: the token of {name} is a placeholder: {service} refuses to start")
            if service in grants_of and name not in grants_of[service]:
                report.error(f"{where}: caller {name} has a token but no AUTH_GRANTS entry (every call PERMISSION_DENIED)")
    for service, ((_, secret, key), text) in client.items():
        example = "maitre.io/example" in ((secrets[secret].get("metadata") or {}).get("annotations") or {})
        token = (text or "").strip()
        if not token or (is_placeholder(token) != example):
            report.error(f"{label}: Secret {secret} key {key}: " + ("empty" if not token else
                         "a placeholder outside an example Secret" if not example else "not a placeholder in an example Secret")
                         + f" ({service} refuses an empty or placeholder token)")
    if "booking-service" in client and "memory-service" in tokens:
        ((_, secret, key), text) = client["booking-service"]
        theirs = dict(parse_token_list(tokens["memory-service"][1] or "")[0])
        if BOOKING_CALLER not in theirs:
            report.error(f"{label}: memory-service's token file has no `{BOOKING_CALLER}:` entry for booking-service's token")
        elif (text or "").strip() != theirs[BOOKING_CALLER]:
            report.error(f"{label}: Secret {secret} key {key} is not the token memory-service lists as `{BOOKING_CALLER}:`")
    if "memory-service" in grants_of:
        for m in booking_calls(root):
            full = next(x for x in proto_methods("memory-service", root) if x.endswith("/" + m))
            if not allows(grants_of["memory-service"], BOOKING_CALLER, full):
                report.error(f"{label}: memory-service's AUTH_GRANTS does not let {BOOKING_CALLER} call {m}, "
                             "which booking-service calls")
    return grants_of


def check_compose(path, report):
    d = load_docs(path)[0]
    for name, s in (d.get("services") or {}).items():
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
        binary = (s.get("command") or [None])[0]
        if binary not in SERVICES or (s.get("command") or [None, None])[1:2] != ["serve"]:
            continue
        credentials = [k for k in ("AUTH_TOKENS", "AUTH_TOKENS_FILE", "TLS_CLIENT_CA_FILE") if k in env]
        if str(env.get("AUTH_MODE", "required")).strip().lower() == "none":
            if credentials:
                report.error(f"{path}: {name} sets AUTH_MODE=none and {', '.join(credentials)}: a startup error")
            for p in s.get("ports") or []:
                parts = str(p).rsplit(":", 2)
                ip = str(p.get("host_ip", "")) if isinstance(p, dict) else parts[0] if len(parts) == 3 else ""
                if ip not in ("127.0.0.1", "::1", "[::1]", "localhost"):
                    report.error(f"{path}: {name} runs with AUTH_MODE=none but publishes {p} beyond loopback")
        elif not credentials:
            report.error(f"{path}: {name} has no credentials configured and no AUTH_MODE=none: it would refuse to start")


def cmd_auth(renders, root=".", compose="deploy/compose.yaml", out=sys.stdout):
    report = Report(out)
    n = 0
    for p in sorted(glob.glob(os.path.join(root, "deploy/k8s/**/*.yaml"), recursive=True)):
        p = os.path.normpath(p)
        for d in load_docs(p):
            if d.get("kind") == "ConfigMap":
                n += 1
                check_auth_mode_none(f"{p}: ConfigMap {d.get('metadata', {}).get('name')}", d.get("data"), report)
            for c in ((((d.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []):
                env = {e.get("name"): e.get("value") for e in c.get("env") or []}
                check_auth_mode_none(f"{p}: {d.get('kind')} {d.get('metadata', {}).get('name')}", env, report)
    if not report.errors:
        report.info(f"{n} ConfigMap document(s) under deploy/k8s: none sets AUTH_MODE=none")
    for label, path in renders:
        before = len(report.errors)
        grants = check_render_auth(label, load_render(path), root, report)
        if len(report.errors) == before:
            report.info(f"{label}: credentials, grants ({'; '.join(f'{s}: ' + ', '.join(sorted(g)) for s, g in sorted(grants.items()))}), "
                        "mounted files and token Secrets consistent")
    if compose and os.path.isfile(os.path.join(root, compose)):
        before = len(report.errors)
        check_compose(os.path.join(root, compose), report)
        if len(report.errors) == before:
            report.info(f"{compose}: AUTH_MODE=none only with loopback-published ports")
    return report.status()


# ------------------------------------------------------------------ self-test
def self_test():
    import tempfile

    def deployment(name, binary, cm, surge=1, strategy=None, env=()):
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {"strategy": strategy or {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge}},
                         "template": {"spec": {"containers": [{"name": name, "command": [binary], "args": ["serve"],
                                                               "envFrom": [{"configMapRef": {"name": cm}}],
                                                               "env": list(env)}]}}}}

    def hpa(name, mx):
        return {"kind": "HorizontalPodAutoscaler", "metadata": {"name": name},
                "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name}, "maxReplicas": mx}}

    def cm(name, **data):
        return {"kind": "ConfigMap", "metadata": {"name": name}, "data": data}

    rust = {"memory-service": '#[arg(\n long,\n env = "DB_MAX_CONNECTIONS",\n default_value_t = 16,\n)]',
            "booking-service": '#[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 20, global = true)]\n'
                               '#[arg(long, env = "OTHER", default_value_t = 99)]\n'
                               '#[arg(long, env = "BOOKING_WORKER_DB_MAX_CONNECTIONS", default_value = "12")]'}
    assert rust_default(rust["memory-service"], "DB_MAX_CONNECTIONS") == 16
    assert rust_default(rust["booking-service"], "BOOKING_WORKER_DB_MAX_CONNECTIONS") == 12
    assert rust_default(rust["booking-service"], "NOPE") is None
    job = {"kind": "Job", "metadata": {"name": "m"}, "spec": {"template": {"spec": {"containers": [
        {"name": "migrate", "command": ["memory-service"], "args": ["migrate"]}]}}}}
    docs = [deployment("memory-service", "memory-service", "mc"), hpa("memory-service", 6),
            deployment("booking-service", "booking-service", "bc"), hpa("booking-service", 4),
            cm("mc", DB_MAX_CONNECTIONS="16"), cm("bc", DB_MAX_CONNECTIONS="20"), job,
            dict(job, metadata={"name": "b"})]
    quiet = Report(io.StringIO())
    b = compute_budget(docs, rust, quiet)
    assert not quiet.errors, quiet.errors
    # booking: 20 + the code's default 12 (not in the ConfigMap) + 1.
    assert [p["per_pod"] for p in b["pods"]] == [33, 17], b
    assert (b["steady"], b["rollout"], b["jobs"], b["recommended"]) == (234, 284, 4, 313), b
    # A percentage surge rounds up; Recreate has none; an env entry beats the ConfigMap; workers off.
    docs2 = [deployment("memory-service", "memory-service", "mc", surge="25%",
                        env=[{"name": "DB_MAX_CONNECTIONS", "value": "10"}]), hpa("memory-service", 6),
             deployment("booking-service", "booking-service", "bc", strategy={"type": "Recreate"}),
             cm("mc", DB_MAX_CONNECTIONS="16"), cm("bc", BOOKING_DISABLE_WORKERS="true")]
    b2 = compute_budget(docs2, rust, quiet)
    assert [(p["per_pod"], p["replicas"], p["surge"]) for p in b2["pods"]] == [(21, 1, 0), (11, 6, 2)], b2
    assert (b2["steady"], b2["rollout"]) == (6 * 11 + 21, 8 * 11 + 21)
    assert compute_budget([cm("x")], rust, quiet)["recommended"] == SUPERUSER_RESERVED

    def claims(*lines):
        r = Report(io.StringIO())
        kinds = {check_claim_line(t, b, "t", r) for t in lines}
        return kinds, r.errors

    ok = ["per memory-service pod: DB_MAX_CONNECTIONS 16 + readiness 1 = 17",
          "per booking-service pod: DB_MAX_CONNECTIONS (20) + BOOKING_WORKER_DB_MAX_CONNECTIONS (12) + readiness (1) = 33",
          "at the HPA maxima: memory-service 6 x 17 + booking-service 4 x 33 = 234 connections",
          "during a rollout (maxSurge 1 each): memory-service 7 x 17 + booking-service 5 x 33 = 284",
          "PostgreSQL max_connections >= 313 (+10%)", "no figure here"]
    kinds, errors = claims(*ok)
    assert not errors and {"per pod", "steady", "rollout", "max_connections"} <= kinds, errors
    for bad in ("at the HPA maxima: memory-service 6 x 16 + booking-service 4 x 32 = 224",
                "per booking-service pod: DB_MAX_CONNECTIONS 20 + readiness 1 = 21",
                "during a rollout: memory-service 6 x 17 + booking-service 4 x 33 = 234",
                "at the HPA maxima: memory-service 6 x 17 = 102",
                "max_connections >= 100", "PostgreSQL needs 176 in total = 176"):
        assert claims(bad)[1], bad
    assert claims("the old figure = 176")[1]

    with tempfile.TemporaryDirectory() as tmp:
        # The built-in renderer: resources, a component, strategic-merge patches by name.
        os.makedirs(os.path.join(tmp, "base"))
        os.makedirs(os.path.join(tmp, "over", "comp"))
        w = lambda p, t: open(os.path.join(tmp, p), "w").write(t)  # noqa: E731
        w("base/kustomization.yaml", "resources: [all.yaml]\n")
        w("base/all.yaml", yaml.safe_dump_all(docs))
        w("over/kustomization.yaml", "resources: [../base]\ncomponents: [comp]\npatches:\n  - path: p.yaml\n")
        w("over/p.yaml", "kind: HorizontalPodAutoscaler\nmetadata: {name: memory-service}\nspec: {maxReplicas: 8}\n")
        w("over/comp/kustomization.yaml", "kind: Component\npatches:\n  - path: q.yaml\n"
          "  - target: {kind: Deployment}\n    patch: |-\n      - op: remove\n        path: /spec\n")
        w("over/comp/q.yaml", "kind: Deployment\nmetadata: {name: booking-service}\nspec:\n  template:\n    spec:\n"
          "      containers:\n        - name: booking-service\n          env:\n"
          "            - {name: BOOKING_WORKER_DB_MAX_CONNECTIONS, value: '2'}\n")
        notes = []
        r = render(os.path.join(tmp, "over"), notes=notes)
        b3 = compute_budget(r, rust, quiet)
        assert [(p["replicas"], p["per_pod"]) for p in b3["pods"]] == [(4, 23), (8, 17)], b3
        assert notes and r[2]["spec"]["template"]["spec"]["containers"][0]["envFrom"], r[2]
        assert owning_kustomization(os.path.join(tmp, "over", "comp", "q.yaml")) == os.path.join(tmp, "over")
        w("README.md", "# x\n### Connection budget\n`DB_MAX_CONNECTIONS` (default 16)\n\n"
          "- memory-service: `DB_MAX_CONNECTIONS` + 1\n  = 17\n\n"
          "| manifests | pods | max | rollout | max_connections |\n|---|---|---|---|---|\n"
          "| `deploy/k8s/base` | 6 memory-service + 4 booking-service | 234 | 284 | ≥ 313 |\n## next\n")
        r = Report(io.StringIO())
        check_readme(os.path.join(tmp, "README.md"), {"deploy/k8s/base": b}, rust, r)
        assert not r.errors, r.errors
        check_readme(os.path.join(tmp, "README.md"), {"deploy/k8s/base": b2}, rust, r)
        assert len(r.errors) == 4, r.errors

    # Auth: grants, token lists.
    served = {"maitre.memory.v1.MemoryService/" + m for m in ("StoreMessage", "GetEmotionHistory", "DeleteUserData")}
    g, problems = parse_grants("assistant=StoreMessage,MemoryService/GetEmotionHistory\nbooking-service=GetEmotionHistory;"
                               "admin=*;ops=maitre.memory.v1.MemoryService/*", served)
    assert not problems, problems
    assert allows(g, "assistant", "maitre.memory.v1.MemoryService/GetEmotionHistory")
    assert not allows(g, "booking-service", "maitre.memory.v1.MemoryService/StoreMessage")
    assert allows(g, "admin", "x.Y/Z") and allows(g, "ops", "maitre.memory.v1.MemoryService/DeleteUserData")
    assert len(parse_grants("a=Nope,Other/X;b c=*;d", served)[1]) == 4
    entries, problems = parse_token_list("# c\nbooking-service:0123456789abcdef\n\nadmin:fedcba9876543210\n")
    assert entries == [("booking-service", "0123456789abcdef"), ("admin", "fedcba9876543210")] and not problems
    assert len(parse_token_list("short:abc,noname,x:0123456789abcdef,y:0123456789abcdef")[1]) == 3
    assert parse_token_list("# only a comment\n")[1]
    assert is_placeholder("CHANGE-ME-token") and is_placeholder("an-Example-1234567") and not is_placeholder("9f2c" * 8)
    r = Report(io.StringIO())
    check_auth_mode_none("t", {"AUTH_MODE": " None "}, r)
    check_auth_mode_none("t", {"AUTH_MODE": "required"}, r)
    assert len(r.errors) == 1
    # A whole render: the services' credentials, grants, mounted files, token Secrets.
    def served_pod(name, binary, env, items):
        d = deployment(name, binary, name + "-config", env=env)
        spec = d["spec"]["template"]["spec"]
        spec["containers"][0]["volumeMounts"] = [{"name": "secrets", "mountPath": "/s"}]
        spec["volumes"] = [{"name": "secrets", "secret": {"secretName": name + "-secrets",
                                                         "items": [{"key": k, "path": k} for k in items]}}]
        return d

    def secret(name, example=True, **data):
        meta = {"name": name, "annotations": {"maitre.io/example": "true"} if example else {}}
        return {"kind": "Secret", "metadata": meta, "stringData": data}

    def auth_errors(docs):
        r = Report(io.StringIO())
        check_render_auth("t", docs, ".", r)
        return r.errors

    mem_token = "CHANGE-ME-booking-service-token"
    good = [served_pod("memory-service", "memory-service", [], ["auth-tokens"]),
            served_pod("booking-service", "booking-service", [], ["auth-tokens", "memory-service-token"]),
            cm("memory-service-config", AUTH_TOKENS_FILE="/s/auth-tokens",
               AUTH_GRANTS="assistant=StoreMessage\nbooking-service=GetEmotionHistory,StoreMessage,DeleteUserData\nadmin=*"),
            cm("booking-service-config", AUTH_TOKENS_FILE="/s/auth-tokens", BOOKING_MEMORY_TOKEN_FILE="/s/memory-service-token",
               BOOKING_MEMORY_URL="http://memory-service:50051", AUTH_GRANTS="assistant=CreateBooking;admin=*"),
            secret("memory-service-secrets", **{"auth-tokens": f"booking-service:{mem_token}\nassistant:CHANGE-ME-assistant-0001\n"}),
            secret("booking-service-secrets", **{"auth-tokens": "assistant:CHANGE-ME-assistant-0002\n",
                                                 "memory-service-token": mem_token})]
    assert auth_errors(good) == [], auth_errors(good)

    def changed(i, f):
        docs = [yaml.safe_load(yaml.safe_dump(d)) for d in good]
        f(docs[i])
        return auth_errors(docs)

    assert len(changed(2, lambda c: c["data"].update(AUTH_MODE="None"))) == 1
    assert changed(2, lambda c: c["data"].update(AUTH_GRANTS="assistant=StoreMessage;admin=*"))  # booking-service ungranted
    assert changed(2, lambda c: c["data"].update(AUTH_GRANTS="booking-service=GetEmotionHistory,StoreMessage,CreateBooking"))
    assert changed(2, lambda c: c["data"].pop("AUTH_TOKENS_FILE"))  # no credentials
    assert changed(3, lambda c: c["data"].pop("AUTH_GRANTS"))
    assert changed(3, lambda c: c["data"].update(BOOKING_MEMORY_URL="https://memory-service:50051"))  # no CA
    assert changed(3, lambda c: c["data"].update(BOOKING_MEMORY_TOKEN_FILE="/elsewhere/token"))
    assert changed(5, lambda s: s["stringData"].update({"memory-service-token": "CHANGE-ME-another-token-0001"}))
    assert changed(5, lambda s: s["stringData"].update({"auth-tokens": "assistant:9f2c9f2c9f2c9f2c9f2c\n"}))  # usable example
    assert changed(5, lambda s: s["metadata"].update(annotations={}))  # placeholders in a real Secret
    assert changed(4, lambda s: s["stringData"].update({"auth-tokens": "# nothing\n"}))
    assert changed(4, lambda s: s["stringData"].update({"auth-tokens": f"stranger:{mem_token}\n"}))  # ungranted name
    with tempfile.TemporaryDirectory() as tmp:
        def compose_errors(env, ports):
            p = os.path.join(tmp, "compose.yaml")
            with open(p, "w") as f:
                yaml.safe_dump({"services": {"memory-service": {"command": ["memory-service", "serve"],
                                                                 "environment": env, "ports": ports}}}, f)
            r = Report(io.StringIO())
            check_compose(p, r)
            return r.errors
        assert compose_errors({"AUTH_MODE": "none"}, ["127.0.0.1:50051:50051", {"target": 1, "host_ip": "::1"}]) == []
        assert compose_errors({"AUTH_MODE": "none"}, ["50051:50051"])
        assert compose_errors({"AUTH_MODE": "none"}, [{"target": 1, "published": 1}])
        assert compose_errors({"AUTH_MODE": "none", "AUTH_TOKENS": "a:b"}, [])
        assert compose_errors({}, ["50051:50051"])
        assert compose_errors({"AUTH_TOKENS": "a:0123456789abcdef"}, ["50051:50051"]) == []
    print("deploy_checks self-test: ok")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    if not argv or argv[0] not in ("budget", "auth"):
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    renders = []
    it = iter(argv[1:])
    for a in it:
        if a == "--render":
            label, _, path = next(it).partition("=")
            renders.append((os.path.normpath(label) if os.path.isdir(label) else label, path or label))
        else:
            print(f"unknown argument {a}", file=sys.stderr)
            return 2
    return cmd_budget(renders) if argv[0] == "budget" else cmd_auth(renders)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
