"""Fail-closed authentication and least-privilege grants.
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
"""
import base64
import glob
import os
import re

from .common import SERVICES, effective_env, load_docs, load_render, objects, read_text, service_containers

PLACEHOLDER_MARKS = ("change-me", "changeme", "change_me", "replace-me", "placeholder", "example", "xxxxxxxx")
MIN_TOKEN_LEN = 16
CALLER_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")
# The name memory-service's grants and token list know booking-service by
# (its token's name, its client certificate's DNS SubjectAltName).
BOOKING_CALLER = "booking-service"


def proto_methods(service, root="."):
    """{'maitre.memory.v1.MemoryService/StoreMessage', ...} of a service's proto files."""
    out = set()
    for p in glob.glob(os.path.join(root, SERVICES[service]["proto"], "**", "*.proto"), recursive=True):
        text = re.sub(r"//[^\n]*", "", read_text(p))
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
        return base64.b64decode(s["data"][key]).decode(errors="replace")
    return None


def booking_calls(root="."):
    """MemoryService methods booking-service's code calls."""
    methods = {m.split("/")[1] for m in proto_methods("memory-service", root)}
    snake = {re.sub(r"(?<!^)([A-Z])", r"_\1", m).lower(): m for m in methods}
    files = glob.glob(os.path.join(root, "booking-service/src/**/*.rs"), recursive=True)
    text = "\n".join(t for t in (read_text(p) for p in sorted(files)) if "MemoryServiceClient" in t)
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


def check_compose_auth(path, report):
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


def check_auth(renders, report, root=".", compose="deploy/compose.yaml"):
    """renders: [(LABEL, kustomize's output file or the kustomization directory)]."""
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
        check_compose_auth(os.path.join(root, compose), report)
        if len(report.errors) == before:
            report.info(f"{compose}: AUTH_MODE=none only with loopback-published ports")

