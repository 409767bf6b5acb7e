"""Kubernetes manifests without a cluster: every complete resource file
against the Kubernetes JSON schemas (kubernetes-validate --strict: unknown
fields are errors) of the oldest and newest versions we support, the
kustomizations' references, and the cross-references between objects."""
import glob
import os

from .common import KUSTOMIZATION_FILES, duration_s, load_docs, matches, python_tool

# Overridden by $MAITRE_KUBE_VERSIONS.
KUBE_VERSIONS = ("1.27.0", "1.37.0")


def kube_validate(paths, versions, report):
    """Validates the files against each version's schemas."""
    ok = True
    for v in versions:
        ok &= report.run(python_tool("kubernetes_validate", "--strict", "--quiet", "-k", v, *paths),
                         f"kubernetes-validate -k {v}")
    if ok and versions:
        report.info(f"valid against Kubernetes {' '.join(versions)}: {' '.join(paths)}")
    return ok


def check_resource_files(ctx, report):
    ctx.resource_files = classify(report)
    if ctx.resource_files:
        kube_validate(ctx.resource_files, ctx.kube_versions, report)


def check_base_references(ctx, report):
    base = [p for p in ctx.resource_files if os.path.dirname(p) == "deploy/k8s/base"]
    check_references("base", [d for p in base for d in load_docs(p)], report, allow_missing_secrets=True)


def kustomizations():
    """{path: the Kustomization or Component} of every kustomization file."""
    out = {}
    for p in sorted(glob.glob("deploy/k8s/**/*.yaml", recursive=True)):
        docs = load_docs(p)
        if docs and isinstance(docs[0], dict) and docs[0].get("kind") in ("Kustomization", "Component"):
            out[p] = docs[0]
    return out


def classify(report):
    """Checks every kustomization's references and returns the YAML files
    under deploy/k8s that hold complete resources (not kustomizations, not
    the patch fragments they reference, which are checked when rendered)."""
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
                if not any(os.path.exists(os.path.join(target, n)) for n in KUSTOMIZATION_FILES):
                    report.error(f"{p}: {what} {r} is a directory without a kustomization.yaml")
            elif not os.path.isfile(target):
                report.error(f"{p}: {what} {r} does not exist")
        report.info(f"kustomization {p}: {len(refs)} reference(s) ok" if not report.errors else f"kustomization {p}")
    files = []
    for p in sorted(glob.glob("deploy/k8s/**/*.yaml", recursive=True)):
        if p in ks:
            continue
        if os.path.normpath(p) in patches:
            report.info(f"patch fragment {p} (checked when rendered)")
            continue
        for i, d in enumerate(load_docs(p)):
            for key in ("apiVersion", "kind", "metadata"):
                if key not in d:
                    report.error(f"{p} document {i + 1}: no {key} (a patch fragment not referenced by any kustomization?)")
        files.append(p)
    report.info(f"{len(files)} resource file(s) to validate")
    return files


def check_references(label, docs, report, allow_missing_secrets=False, external_secrets=()):
    """Cross-references and hardening of one set of objects: what selects,
    mounts or names something finds it; workloads are locked down; serving
    pods skip migrations (the Jobs run them) and drain within their grace
    period. allow_missing_secrets: the base leaves Secrets to the overlays;
    external_secrets: created out of band (cert-manager)."""
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
                report.error(f"{where}: Secret {name} is not defined")
            return
        if key is not None and key not in keys:
            report.error(f"{where}: Secret {name} has no key {key}")

    workloads = [("Deployment", n, d) for n, d in deployments.items()] + [("Job", n, d) for n, d in jobs.items()]
    ports_of = {}
    for kind, name, w in workloads:
        where = f"{kind}/{name}"
        tpl = w["spec"]["template"]
        spec = tpl["spec"]
        pod_sc = spec.get("securityContext") or {}
        sa = spec.get("serviceAccountName")
        if sa and sa not in sas:
            report.error(f"{where}: ServiceAccount {sa} is not defined")
        if spec.get("automountServiceAccountToken") is not False:
            report.error(f"{where}: automountServiceAccountToken should be false")
        if (pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            report.error(f"{where}: pod seccompProfile should be RuntimeDefault")
        if kind == "Deployment":
            sel = w["spec"]["selector"]["matchLabels"]
            if not matches(sel, tpl["metadata"]["labels"]):
                report.error(f"{where}: selector {sel} does not match its pod template")
            if "replicas" in w["spec"] and any(h["spec"]["scaleTargetRef"]["name"] == name for h in hpas.values()):
                report.error(f"{where}: has spec.replicas although an HPA scales it (kubectl apply would reset the scale)")
        volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
        for vname, v in volumes.items():
            if "secret" in v:
                for it in v["secret"].get("items", []) or [None]:
                    check_secret(f"{where} volume {vname}", v["secret"]["secretName"], it and it["key"])
            if "configMap" in v and v["configMap"]["name"] not in cms:
                report.error(f"{where} volume {vname}: ConfigMap {v['configMap']['name']} is not defined")
        containers = spec.get("containers", []) + (spec.get("initContainers") or [])
        for c in containers:
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                report.error(f"{cw}: allowPrivilegeEscalation should be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                report.error(f"{cw}: readOnlyRootFilesystem should be true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                report.error(f"{cw}: capabilities should drop ALL")
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                report.error(f"{cw}: runAsNonRoot should be true")
            res = c.get("resources") or {}
            for k in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(k) or {}):
                        report.error(f"{cw}: no resources.{k}.{r}")
            env = {}
            for ef in c.get("envFrom", []) or []:
                if "configMapRef" in ef:
                    cm = cms.get(ef["configMapRef"]["name"])
                    if cm is None:
                        report.error(f"{cw}: envFrom ConfigMap {ef['configMapRef']['name']} is not defined")
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
                        report.error(f"{cw} env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']}")
                env[e["name"]] = e.get("value")
            for m in c.get("volumeMounts", []) or []:
                if m["name"] not in volumes:
                    report.error(f"{cw}: volumeMount {m['name']} has no volume")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", []) or []}
            ports_of.setdefault((kind, name), {}).update(ports)
            binary = (c.get("command") or [None])[0]
            args = c.get("args") or []
            if binary not in ("memory-service", "booking-service"):
                report.error(f"{cw}: command should start with memory-service or booking-service, got {c.get('command')}")
                continue
            if kind == "Job":
                if args != ["migrate"]:
                    report.error(f"{cw}: a migration Job should run `{binary} migrate`, got args {args}")
                if spec.get("restartPolicy") not in ("Never", "OnFailure"):
                    report.error(f"{where}: restartPolicy must be Never or OnFailure")
                continue
            if args != ["serve"]:
                report.error(f"{cw}: a serving Deployment should run `{binary} serve`, got args {args}")
            if str(env.get("SKIP_MIGRATIONS", "")).lower() != "true":
                report.error(f"{cw}: SKIP_MIGRATIONS must be \"true\" (the Jobs migrate)")
            if "DATABASE_URL" not in env:
                report.error(f"{cw}: no DATABASE_URL")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                pr = c.get(probe)
                if not pr:
                    report.error(f"{cw}: no {probe}")
                    continue
                if "grpc" in pr and pr["grpc"]["port"] not in ports.values():
                    report.error(f"{cw}: {probe} gRPC port {pr['grpc']['port']} is not a container port")
                for h in ("httpGet", "tcpSocket"):
                    if h in pr:
                        p = pr[h]["port"]
                        if p not in ports and p not in ports.values():
                            report.error(f"{cw}: {probe} port {p} is not a container port")
            if "grpc" in (c.get("livenessProbe") or {}) and c["livenessProbe"]["grpc"].get("service") != "liveness":
                report.error(f"{cw}: the gRPC livenessProbe should ask for service \"liveness\" (readiness follows the database)")
            shutdown = duration_s(env.get("SHUTDOWN_TIMEOUT") or "20s")
            pre = 0
            cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
            if len(cmd) == 2 and cmd[0] == "sleep":
                pre = duration_s(cmd[1]) or 0
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if shutdown is None:
                report.error(f"{cw}: SHUTDOWN_TIMEOUT is not a duration")
            elif grace < pre + shutdown + 5:
                report.error(f"{cw}: terminationGracePeriodSeconds {grace} < preStop {pre}s + SHUTDOWN_TIMEOUT {shutdown}s + 5s margin")
    for name, s in objs.get("Service", {}).items():
        sel = s["spec"].get("selector") or {}
        hit = [n for n, d in deployments.items() if matches(sel, d["spec"]["template"]["metadata"]["labels"])]
        if not hit:
            report.error(f"Service/{name}: selector {sel} matches no Deployment's pods")
        for n, j in jobs.items():
            if matches(sel, j["spec"]["template"]["metadata"]["labels"]):
                report.error(f"Service/{name}: selector {sel} also matches Job/{n}'s pods")
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for n in hit:
                cp = ports_of.get(("Deployment", n), {})
                if tp not in cp and tp not in cp.values():
                    report.error(f"Service/{name} port {p.get('name')}: targetPort {tp} is not a port of Deployment/{n}")
            if p.get("name") == "grpc" and p.get("appProtocol") != "grpc":
                report.error(f"Service/{name}: port grpc should have appProtocol: grpc")
    for name, h in hpas.items():
        ref = h["spec"]["scaleTargetRef"]
        if ref["name"] not in objs.get(ref["kind"], {}):
            report.error(f"HorizontalPodAutoscaler/{name}: target {ref['kind']}/{ref['name']} is not defined")
        if h["spec"].get("minReplicas", 1) < 2:
            report.error(f"HorizontalPodAutoscaler/{name}: minReplicas < 2 leaves a single pod")
    for name, p in objs.get("PodDisruptionBudget", {}).items():
        sel = p["spec"]["selector"]["matchLabels"]
        hit = [n for n, d in deployments.items() if matches(sel, d["spec"]["template"]["metadata"]["labels"])]
        if not hit:
            report.error(f"PodDisruptionBudget/{name}: selector matches no Deployment")
        for n in hit:
            mins = [h["spec"].get("minReplicas", 1) for h in hpas.values() if h["spec"]["scaleTargetRef"]["name"] == n]
            if mins and isinstance(p["spec"].get("minAvailable"), int) and p["spec"]["minAvailable"] >= min(mins):
                report.error(f"PodDisruptionBudget/{name}: minAvailable >= the HPA's minReplicas blocks every node drain")
    for name, np in objs.get("NetworkPolicy", {}).items():
        sel = np["spec"]["podSelector"].get("matchLabels") or {}
        hit = [(k, n) for k, n, w in workloads if matches(sel, w["spec"]["template"]["metadata"]["labels"])]
        if not hit:
            report.error(f"NetworkPolicy/{name}: podSelector {sel} matches no workload")
        for rule in np["spec"].get("ingress", []) or []:
            for p in rule.get("ports", []) or []:
                for k, n in hit:
                    cp = ports_of.get((k, n), {})
                    if p["port"] not in cp.values() and p["port"] not in cp:
                        report.error(f"NetworkPolicy/{name}: ingress port {p['port']} is not a port of {k}/{n}")
        for rule in np["spec"].get("egress", []) or []:
            for peer in rule.get("to", []) or []:
                # A peer in the policy's own namespace should be one of ours.
                psel = (peer.get("podSelector") or {}).get("matchLabels")
                if psel and "namespaceSelector" not in peer:
                    if not any(matches(psel, w["spec"]["template"]["metadata"]["labels"]) for _, _, w in workloads):
                        report.error(f"NetworkPolicy/{name}: egress peer {psel} matches no workload")
    report.info(f"{label}: {sum(len(v) for v in objs.values())} objects cross-checked")
