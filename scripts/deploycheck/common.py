"""What every check of deploy/ shares: the report a check writes to, YAML
loading, a small kustomize-compatible renderer (the fallback when neither
kustomize nor kubectl is installed), and what the Rust code says about the
services' settings."""
import glob
import os
import re
import subprocess
import sys

import yaml

SERVICES = {
    "memory-service": {
        "pools": ("DB_MAX_CONNECTIONS",),
        "proto": "proto/maitre/memory",
    },
    "booking-service": {
        "pools": ("DB_MAX_CONNECTIONS", "BOOKING_WORKER_DB_MAX_CONNECTIONS"),
        "proto": "proto/maitre/booking",
    },
}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


class Report:
    """What one check found: errors fail it, warnings only fail it under
    --strict, a skip says why it could not run here."""

    def __init__(self, out=sys.stdout):
        self.errors, self.warnings, self.skipped, self.out = [], [], None, out

    def error(self, msg):
        self.errors.append(msg)
        print("  error: " + msg, file=self.out)

    def warn(self, msg):
        self.warnings.append(msg)
        print("  warning: " + msg, file=self.out)

    def info(self, msg):
        print("  " + msg, file=self.out)

    def skip(self, why):
        self.skipped = why
        self.info(why)

    def status(self):
        return "FAIL" if self.errors else "skip" if self.skipped else "warn" if self.warnings else "ok"

    def run(self, argv, what=None, stdout=None):
        """Runs an external tool and shows its output (with stdout=FILE: its
        stderr only); its failure is an error."""
        try:
            p = subprocess.run(argv, stdout=stdout or subprocess.PIPE, stderr=subprocess.STDOUT if stdout is None
                               else subprocess.PIPE, text=True)
        except OSError as e:
            self.error(f"{what or argv[0]}: {e}")
            return False
        for line in (p.stderr if stdout else p.stdout).splitlines():
            self.info(line)
        if p.returncode != 0:
            self.error(f"{what or ' '.join(argv)}: exit {p.returncode}")
        return p.returncode == 0


def succeeds(argv):
    """Whether a command exists here and exits 0 (output discarded)."""
    try:
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


def python_tool(module, *args):
    """argv running a Python tool installed next to PyYAML (PYTHONPATH)."""
    return [sys.executable, "-m", module, *args]


# ------------------------------------------------------------------ loading
def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


def duration_s(v):
    """Seconds of a duration as the services parse it (20s, 500ms, 1m)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(v))
    if not m:
        return None
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


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


def documented_defaults(root="."):
    """{service: {VARIABLE: default}} from README.md's configuration tables.

    The README, not the Rust source, is read: the Rust test `tests/config`
    keeps those tables equal to what each service's clap command declares,
    so the defaults here are the code's without parsing Rust."""
    defaults = {s: {} for s in SERVICES}
    section = None
    for line in read_text(os.path.join(root, "README.md")).splitlines():
        heading = re.match(r"#{2,3} (.*)", line)
        if heading:
            title = heading.group(1).strip()
            section = "both" if title == "Both services" else title if title in SERVICES else None
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if section is None or not line.startswith("| `") or len(cells) < 3:
            continue
        if section == "both":
            defaults["memory-service"][cells[0]] = cells[1]
            defaults["booking-service"][cells[0]] = cells[2]
        else:
            defaults[section][cells[0]] = cells[1]
    return defaults


def pool_default(defaults, name):
    """The integer default of variable `name`, or None when not documented."""
    value = defaults.get(name)
    return int(value) if value is not None and value.isdigit() else None


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
