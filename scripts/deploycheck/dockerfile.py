"""deploy/Dockerfile without a Docker engine: hadolint, and the build's
inputs checked against the workspace; `docker build --check` only when a
Docker engine answers."""
import glob
import os
import re
import shutil
import tomllib

from .common import read_text, succeeds

DOCKERFILE = "deploy/Dockerfile"


def check_dockerfile(ctx, report):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        report.error("hadolint not found on PATH (scripts/validate-deploy.sh installs it)")
    elif report.run([hadolint, DOCKERFILE], "hadolint"):
        report.info("hadolint: no findings")
    check_build_inputs(DOCKERFILE, report)


def check_docker_build(ctx, report):
    if not succeeds(["docker", "info"]):
        report.skip("no Docker engine answers: 'docker build --check' skipped")
        return
    report.run(["docker", "build", "--check", "-f", DOCKERFILE, "."])


def check_build_inputs(path, report):
    """Every COPY source exists; every workspace member's Cargo.toml (and
    what the build needs at compile time, [patch] crates included) is copied
    before the first cargo build; the builder's Rust is new enough; a locked release build; a
    numeric non-root USER; the binary is PID 1."""
    text = read_text(path)
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
                report.error(f"COPY source {src} does not exist in the build context (the repository root)")
    with open("Cargo.toml", "rb") as f:
        cargo = tomllib.load(f)
    for m in cargo.get("workspace", {}).get("members", []):
        for mm in glob.glob(m) or [m]:
            manifest = os.path.normpath(os.path.join(mm, "Cargo.toml"))
            if manifest not in copied and os.path.normpath(mm) not in copied:
                report.error(f"workspace member {mm}: {manifest} is not copied before the first cargo build")
    for table in cargo.get("patch", {}).values():
        for name, spec in table.items():
            path = spec.get("path") if isinstance(spec, dict) else None
            if path and not any(os.path.normpath(path) == c or os.path.normpath(path).startswith(c + "/")
                                for c in copied):
                report.error(f"patched crate {name}: {path} is not copied (the dependency build needs it)")
    for d in ("memory-service/migrations", "booking-service/migrations", "proto", "build.rs"):
        if not any(d == c or d.startswith(c + "/") for c in copied):
            report.error(f"{d} is not copied (needed at compile time)")
    want = cargo.get("workspace", {}).get("package", {}).get("rust-version")
    m = re.search(r"ARG RUST_VERSION=(\d+)\.(\d+)", text)
    if want and m:
        have = (int(m.group(1)), int(m.group(2)))
        need = tuple(int(x) for x in want.split(".")[:2])
        if have < need:
            report.error(f"builder Rust {have[0]}.{have[1]} < workspace rust-version {want}")
    elif want:
        report.error("no ARG RUST_VERSION=<major>.<minor> to compare with the workspace's rust-version")
    if "--locked" not in text or "cargo build --release" not in text:
        report.error("the build should be `cargo build --release --locked`, as in CI")
    if not re.search(r"^USER\s+\d+", text, re.M):
        report.error("the runtime stage should switch to a numeric non-root USER")
    if re.search(r"^ENTRYPOINT\s+\[?\s*\"?(/bin/)?(ba)?sh", text, re.M):
        report.error("no shell entrypoint: the binary must be PID 1")
    report.info(f"COPY sources exist; workspace members {cargo.get('workspace', {}).get('members')} copied; rust-version {want}")
