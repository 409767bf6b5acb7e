"""Small manifests for the tests: each builder returns a valid object, and
a test breaks one thing in it."""
import contextlib
import copy
import os
import tempfile

import yaml


def deployment(name, binary, cm, surge=1, strategy=None, env=()):
    """A bare Deployment, enough for the budget and auth checks."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"strategy": strategy or {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge}},
                     "template": {"spec": {"containers": [{"name": name, "command": [binary], "args": ["serve"],
                                                           "envFrom": [{"configMapRef": {"name": cm}}],
                                                           "env": list(env)}]}}}}


def hpa(name, mx, mn=2):
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": name},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": mn, "maxReplicas": mx}}


def cm(name, **data):
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


# Rust sources as the budget check reads them: clap attributes.
DEFAULTS = {"memory-service": {"DB_MAX_CONNECTIONS": "16"},
            "booking-service": {"DB_MAX_CONNECTIONS": "20", "OTHER": "99",
                                "BOOKING_WORKER_DB_MAX_CONNECTIONS": "12", "BOOKING_MEMORY_URL": "http://x"}}


def hardened_workload(kind="Deployment", name="memory-service", args=("serve",)):
    """A Deployment (or migration Job) that passes k8s.check_references."""
    labels = {"app": name} if kind == "Deployment" else {"app": name + "-migrate"}
    container = {
        "name": name, "image": "maitre:1", "command": ["memory-service"], "args": list(args),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
        "envFrom": [{"configMapRef": {"name": "memory-service-config"}}],
    }
    spec = {"serviceAccountName": "maitre", "automountServiceAccountToken": False,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}, "containers": [container]}
    if kind == "Job":
        spec["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name + "-migrate"},
                "spec": {"template": {"metadata": {"labels": labels}, "spec": spec}}}
    container["ports"] = [{"name": "grpc", "containerPort": 50051}, {"name": "admin", "containerPort": 9101}]
    container["env"] = [{"name": "SKIP_MIGRATIONS", "value": "true"}]
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    for probe in ("startupProbe", "readinessProbe"):
        container[probe] = {"grpc": {"port": 50051}}
    container["livenessProbe"] = {"grpc": {"port": 50051, "service": "liveness"}}
    spec["terminationGracePeriodSeconds"] = 30
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": spec}}}


def hardened_objects():
    """A set of objects that k8s.check_references accepts."""
    return [
        hardened_workload(), hardened_workload("Job", args=("migrate",)), hpa("memory-service", 6),
        cm("memory-service-config", DATABASE_URL="postgres://db/maitre", SHUTDOWN_TIMEOUT="20s"),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "maitre"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "memory-service"},
         "spec": {"selector": {"app": "memory-service"},
                  "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "grpc"}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "memory-service"},
         "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "memory-service"}}}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "memory-service"},
         "spec": {"podSelector": {"matchLabels": {"app": "memory-service"}},
                  "ingress": [{"ports": [{"port": 50051}]}]}},
    ]


def changed(objects, i, change):
    """A deep copy of objects with change applied to objects[i]."""
    out = copy.deepcopy(objects)
    change(out[i])
    return out


@contextlib.contextmanager
def repository(files):
    """A temporary directory holding files ({path: text or YAML documents}),
    made the working directory, as the checks run from the repository root."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        for path, content in files.items():
            full = os.path.join(tmp, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(content if isinstance(content, str) else yaml.safe_dump_all(content))
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(old)


# The repository: the auth checks read proto/ and booking-service's code.
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def repository_file(path):
    """The text of a file of this repository: the good baseline that a test
    breaks in one place."""
    with open(os.path.join(REPO_ROOT, path)) as f:
        return f.read()
