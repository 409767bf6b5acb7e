"""kustomize's renders of base, overlays/example and overlays/example with
the mtls component (kustomize or `kubectl kustomize`, whichever is
installed; skipped without either), each validated like the raw files."""
import os
import shutil

from .common import load_docs, succeeds
from .k8s import check_references, kube_validate

# name -> the kustomization directory it renders (None: made in ctx.tmp).
RENDERS = {
    "base": "deploy/k8s/base",
    "example": "deploy/k8s/overlays/example",
    "example+mtls": None,
}
# The Secrets of the mtls component that cert-manager creates.
MTLS_SECRETS = ("memory-service-tls", "booking-service-tls", "booking-service-memory-client-tls")
NAMESPACE = "maitre"


def renderer():
    """The kustomize command line, or None when none is installed."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl") and succeeds(["kubectl", "kustomize", "--help"]):
        return ["kubectl", "kustomize"]
    return None


def mtls_kustomization(tmp):
    """mtls is a component the example overlay leaves commented out: a
    throwaway kustomization adds it (kustomize accepts relative paths only)."""
    d = os.path.join(tmp, "mtls-on")
    os.makedirs(d, exist_ok=True)
    rel = os.path.relpath(os.path.abspath(RENDERS["example"]), d)
    with open(os.path.join(d, "kustomization.yaml"), "w") as f:
        f.write("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - {rel}\ncomponents:\n  - {rel}/mtls\n")
    return d


def source_dir(ctx, name):
    return RENDERS[name] or mtls_kustomization(ctx.tmp)


def check_renders(ctx, report):
    cmd = renderer()
    if cmd is None:
        report.skip("neither kustomize nor kubectl is installed: rendering skipped "
                    "(the resource file and cross-reference checks covered the raw files)")
        return
    report.info(f"renderer: {' '.join(cmd)}")
    for name in RENDERS:
        out = os.path.join(ctx.tmp, f"rendered-{name}.yaml")
        with open(out, "w") as f:
            rendered = report.run(cmd + [source_dir(ctx, name)], f"render {name}", stdout=f)
        if not rendered:
            continue
        docs = load_docs(out)
        report.info(f"render {name}: {len(docs)} objects")
        ctx.rendered[name] = out
        kube_validate([out], ctx.kube_versions, report)
        check_references(f"rendered {name}", docs, report, allow_missing_secrets=name == "base",
                         external_secrets=MTLS_SECRETS if name == "example+mtls" else ())
        if name != "base":
            outside = sorted({d["metadata"].get("namespace") for d in docs} - {None, NAMESPACE})
            if outside:
                report.error(f"render {name}: objects outside namespace {NAMESPACE} ({', '.join(outside)})")


def renders(ctx):
    """[(LABEL, PATH)] for the budget and auth checks: kustomize's render
    when check_renders made one, else the kustomization directory (which
    they then render with common.render)."""
    out = []
    for name in RENDERS:
        src = source_dir(ctx, name)
        label = RENDERS[name] or RENDERS["example"] + "+mtls"
        out.append((label, ctx.rendered.get(name) or src))
    return out
