"""python3 -m deploycheck [--strict] [--self-test]

Runs every check of deploy/ from the repository root, prints what each
found and a summary; exits 1 when a check failed. A check fails on errors;
warnings fail it only with --strict; a check that cannot run here (no
kustomize, no Docker engine) is skipped. --self-test runs the checks' own
tests (deploycheck/tests) instead.

$MAITRE_KUBE_VERSIONS: the Kubernetes versions whose schemas the manifests
must satisfy (default: the oldest and newest supported, k8s.KUBE_VERSIONS).
"""
import argparse
import os
import sys
import tempfile
import traceback
import unittest
from dataclasses import dataclass, field

from . import compose, dashboard, dockerfile, k8s, kustomize, lint
from .auth import check_auth
from .budget import check_budget
from .common import Report


@dataclass
class Context:
    """What the checks share: settings, and what earlier checks found."""
    tmp: str
    kube_versions: list
    resource_files: list = field(default_factory=list)  # set by k8s.check_resource_files
    rendered: dict = field(default_factory=dict)  # render name -> file, set by kustomize.check_renders


def check_connection_budget(ctx, report):
    check_budget(kustomize.renders(ctx), report)


def check_authentication(ctx, report):
    check_auth(kustomize.renders(ctx), report)


CHECKS = (
    ("yamllint (deploy/**/*.yaml)", lint.check_yaml),
    ("Kubernetes resource files (schemas {versions})", k8s.check_resource_files),
    ("Kubernetes cross-references (base)", k8s.check_base_references),
    ("kustomize render + validate (base, example, example+mtls)", kustomize.check_renders),
    ("compose (compose-spec schema + start order)", compose.check_compose),
    ("Grafana dashboard (JSON + PromQL)", dashboard.check_dashboards),
    ("Dockerfile (hadolint + COPY/workspace checks)", dockerfile.check_dockerfile),
    ("docker build --check", dockerfile.check_docker_build),
    ("PostgreSQL connection budget (comments, README)", check_connection_budget),
    ("authentication and grants (AUTH_MODE, tokens, AUTH_GRANTS)", check_authentication),
)


def self_test():
    here = os.path.dirname(os.path.abspath(__file__))
    suite = unittest.TestLoader().discover(os.path.join(here, "tests"), top_level_dir=os.path.dirname(here))
    result = unittest.TextTestRunner(verbosity=1).run(suite)
    return 0 if result.wasSuccessful() else 1


def run_checks(strict):
    if not os.path.isdir("deploy"):
        print(f"no deploy/ directory in {os.getcwd()}: run from the repository root", file=sys.stderr)
        return 2
    versions = os.environ.get("MAITRE_KUBE_VERSIONS", "").split() or list(k8s.KUBE_VERSIONS)
    results = []
    with tempfile.TemporaryDirectory(prefix="validate-deploy.") as tmp:
        ctx = Context(tmp=tmp, kube_versions=versions)
        for title, check in CHECKS:
            title = title.format(versions=" ".join(versions))
            print(f"\n==> {title}", flush=True)
            report = Report()
            try:
                check(ctx, report)
            except Exception:  # a manifest shaped unlike any we know fails its check
                report.error("the check crashed:\n" + traceback.format_exc())
            status = report.status()
            if strict and status == "warn":
                status = "FAIL"
            print(f"    -> {status}", flush=True)
            results.append((status, title))
    print("\nvalidate-deploy summary")
    for status, title in results:
        print(f"  {status:<5} {title}")
    count = {s: sum(1 for r, _ in results if r == s) for s in ("ok", "warn", "FAIL", "skip")}
    if count["warn"]:
        print(f"{count['warn']} check(s) with warnings (not failures; --strict makes them fail)")
    print(f"{count['ok'] + count['warn']} passed, {count['FAIL']} failed, {count['skip']} skipped")
    return 1 if count["FAIL"] else 0


def main(argv):
    parser = argparse.ArgumentParser(prog="python3 -m deploycheck", description=__doc__.split("\n\n")[1])
    parser.add_argument("--strict", action="store_true", help="warnings fail their check")
    parser.add_argument("--self-test", action="store_true", help="run the checks' own tests and nothing else")
    args = parser.parse_args(argv)
    return self_test() if args.self_test else run_checks(args.strict)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
