import io
import unittest

from deploycheck.common import Report
from deploycheck.k8s import check_references, classify, kube_validate
from deploycheck.tests.fixtures import changed, hardened_objects, hardened_workload, repository


def reference_errors(objects, **kw):
    r = Report(io.StringIO())
    check_references("t", objects, r, **kw)
    return r.errors


def container(workload):
    return workload["spec"]["template"]["spec"]["containers"][0]


class CrossReferences(unittest.TestCase):
    def test_hardened_objects_pass(self):
        self.assertEqual(reference_errors(hardened_objects()), [])

    def test_each_broken_reference_or_setting_fails(self):
        cases = {
            "privilege escalation": (0, lambda d: container(d)["securityContext"].update(allowPrivilegeEscalation=True)),
            "writable root": (0, lambda d: container(d)["securityContext"].pop("readOnlyRootFilesystem")),
            "no resources": (0, lambda d: container(d).pop("resources")),
            "token mounted": (0, lambda d: d["spec"]["template"]["spec"].pop("automountServiceAccountToken")),
            "no seccomp": (0, lambda d: d["spec"]["template"]["spec"].pop("securityContext")),
            "unknown ServiceAccount": (0, lambda d: d["spec"]["template"]["spec"].update(serviceAccountName="x")),
            "selector misses template": (0, lambda d: d["spec"]["selector"]["matchLabels"].update(app="x")),
            "replicas beside an HPA": (0, lambda d: d["spec"].update(replicas=2)),
            "serving pod migrates": (0, lambda d: container(d)["env"].clear()),
            "unknown ConfigMap": (0, lambda d: container(d)["envFrom"][0]["configMapRef"].update(name="x")),
            "missing Secret": (0, lambda d: container(d)["env"].append(
                {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})),
            "mount without volume": (0, lambda d: container(d).update(volumeMounts=[{"name": "v", "mountPath": "/v"}])),
            "probe on no port": (0, lambda d: container(d)["readinessProbe"]["grpc"].update(port=1)),
            "liveness follows readiness": (0, lambda d: container(d)["livenessProbe"]["grpc"].pop("service")),
            "grace too short": (0, lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20)),
            "serve not run": (0, lambda d: container(d).update(args=["migrate"])),
            "not our binary": (0, lambda d: container(d).update(command=["sh"])),
            "Job does not migrate": (1, lambda d: container(d).update(args=["serve"])),
            "Job restarts forever": (1, lambda d: d["spec"]["template"]["spec"].update(restartPolicy="Always")),
            "HPA of one pod": (2, lambda d: d["spec"].update(minReplicas=1)),
            "no DATABASE_URL": (3, lambda d: d["data"].pop("DATABASE_URL")),
            "SHUTDOWN_TIMEOUT no duration": (3, lambda d: d["data"].update(SHUTDOWN_TIMEOUT="soon")),
            "Service selects nothing": (5, lambda d: d["spec"].update(selector={"app": "x"})),
            "Service targets no port": (5, lambda d: d["spec"]["ports"][0].update(targetPort="web")),
            "gRPC port without appProtocol": (5, lambda d: d["spec"]["ports"][0].pop("appProtocol")),
            "PDB blocks drains": (6, lambda d: d["spec"].update(minAvailable=2)),
            "NetworkPolicy selects nothing": (7, lambda d: d["spec"]["podSelector"].update(matchLabels={"app": "x"})),
            "NetworkPolicy opens no port": (7, lambda d: d["spec"]["ingress"][0]["ports"][0].update(port=1)),
        }
        for what, (i, change) in cases.items():
            with self.subTest(what):
                self.assertTrue(reference_errors(changed(hardened_objects(), i, change)))

    def test_secrets_left_to_overlays_or_created_elsewhere(self):
        objects = hardened_objects()
        container(objects[0])["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
        self.assertEqual(reference_errors(objects, allow_missing_secrets=True), [])
        self.assertEqual(reference_errors(objects, external_secrets=("s",)), [])


KUSTOMIZATION = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"


class Classify(unittest.TestCase):
    def classify(self, files):
        with repository(files):
            r = Report(io.StringIO())
            return classify(r), r.errors

    def test_resources_and_patch_fragments(self):
        files, errors = self.classify({
            "deploy/k8s/base/kustomization.yaml": KUSTOMIZATION + "resources: [app.yaml]\n",
            "deploy/k8s/base/app.yaml": [hardened_workload()],
            "deploy/k8s/over/kustomization.yaml": KUSTOMIZATION + "resources: [../base]\npatches:\n  - path: p.yaml\n",
            "deploy/k8s/over/p.yaml": "kind: Deployment\nmetadata: {name: memory-service}\n",
        })
        self.assertEqual((files, errors), (["deploy/k8s/base/app.yaml"], []))

    def test_missing_reference_fails(self):
        _, errors = self.classify({"deploy/k8s/base/kustomization.yaml": KUSTOMIZATION + "resources: [gone.yaml]\n"})
        self.assertTrue(errors)

    def test_unreferenced_fragment_fails(self):
        _, errors = self.classify({"deploy/k8s/base/kustomization.yaml": KUSTOMIZATION + "resources: []\n",
                                   "deploy/k8s/base/stray.yaml": "spec: {replicas: 2}\n"})
        self.assertTrue(errors)


class Schemas(unittest.TestCase):
    def validate(self, objects):
        with repository({"app.yaml": objects}):
            r = Report(io.StringIO())
            return kube_validate(["app.yaml"], ["1.37.0"], r)

    def test_valid_and_unknown_field(self):
        self.assertTrue(self.validate([hardened_workload()]))
        self.assertFalse(self.validate(changed([hardened_workload()], 0, lambda d: d["spec"].update(replica=2))))


if __name__ == "__main__":
    unittest.main()
