"""deploy/compose.yaml: the compose-spec JSON schema (check-jsonschema's
vendored copy), the start order and settings, and `docker compose config`
when a compose plugin is installed."""
import os
import re

from .common import load_docs, python_tool, succeeds

COMPOSE_FILE = "deploy/compose.yaml"


def check_compose(ctx, report):
    report.run(python_tool("check_jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE),
               "check-jsonschema (compose-spec)")
    check_start_order(COMPOSE_FILE, report)
    if succeeds(["docker", "compose", "version"]):
        if report.run(["docker", "compose", "-f", COMPOSE_FILE, "config", "--quiet"]):
            report.info("docker compose config: ok")
    else:
        report.info("docker compose: not available here (no compose plugin); the schema check above stands in for it")


def check_start_order(path, report):
    """The services, their start order (postgres healthy, then the migrations,
    then the servers), commands, settings and published ports."""
    d = load_docs(path)[0]
    services = d.get("services", {})
    for need in ("postgres", "memory-migrate", "booking-migrate", "memory-service", "booking-service"):
        if need not in services:
            report.error(f"no service {need}")
    if report.errors:
        return
    pg = services["postgres"]
    if "pg_isready" not in " ".join(map(str, (pg.get("healthcheck") or {}).get("test", []))):
        report.error("postgres: healthcheck should run pg_isready")
    for name in ("memory-migrate", "booking-migrate", "memory-service", "booking-service"):
        s = services[name]
        b = s.get("build") or {}
        ctx = os.path.normpath(os.path.join(os.path.dirname(path), b.get("context", ".")))
        if not os.path.isfile(os.path.join(ctx, "Cargo.toml")):
            report.error(f"{name}: build context {ctx} is not the workspace root")
        if not os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))):
            report.error(f"{name}: dockerfile {b.get('dockerfile')} not found in {ctx}")
        cmd = s.get("command") or []
        binary = name.split("-")[0] + "-service"
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        if "DATABASE_URL" not in env:
            report.error(f"{name}: no DATABASE_URL")
        if name.endswith("-migrate"):
            if cmd != [binary, "migrate"]:
                report.error(f"{name}: command should be [{binary}, migrate], got {cmd}")
            if (s.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
                report.error(f"{name}: should wait for postgres: service_healthy")
            if str(s.get("restart", "no")) != "no":
                report.error(f"{name}: a one-shot migration should not restart")
        else:
            if cmd != [binary, "serve"]:
                report.error(f"{name}: command should be [{binary}, serve], got {cmd}")
            migrate = binary.split("-")[0] + "-migrate"
            if (s.get("depends_on") or {}).get(migrate, {}).get("condition") != "service_completed_successfully":
                report.error(f"{name}: should wait for {migrate}: service_completed_successfully")
            if str(env.get("SKIP_MIGRATIONS", "")).lower() != "true":
                report.error(f"{name}: SKIP_MIGRATIONS should be true (the migrate services migrate)")
            if str(env.get("LOG_FORMAT")) != "json":
                report.error(f"{name}: LOG_FORMAT should be json")
    url = (services["booking-service"].get("environment") or {}).get("BOOKING_MEMORY_URL", "")
    m = re.match(r"https?://([^:/]+):(\d+)", url)
    if not m or m.group(1) not in services:
        report.error(f"booking-service: BOOKING_MEMORY_URL {url!r} should name the memory-service service")
    published = {str(p).rsplit(":", 1)[-1] for s in services.values() for p in s.get("ports", []) or []}
    for port in ("50051", "50052", "9101", "9102"):
        if port not in published:
            report.error(f"port {port} is not published")
    if not report.errors:
        report.info(f"{len(services)} services: start order, commands, migrations and ports ok")
