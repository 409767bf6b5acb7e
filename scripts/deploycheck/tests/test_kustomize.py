import io
import os
import shutil
import tempfile
import unittest

from deploycheck.common import Report
from deploycheck.kustomize import check_renders, renderer, renders
from deploycheck.tests.fixtures import REPO_ROOT


class Context:
    # No schema versions: test_k8s tests the schema validation, and it is slow.
    def __init__(self, tmp):
        self.tmp, self.kube_versions, self.rendered = tmp, [], {}


@unittest.skipIf(renderer() is None, "neither kustomize nor kubectl is installed")
class Renders(unittest.TestCase):
    """The repository's deploy/k8s, copied, rendered with one thing broken."""

    def render_errors(self, path=None, old=None, new=None):
        old_cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.join(REPO_ROOT, "deploy/k8s"), os.path.join(tmp, "deploy/k8s"))
            if path:
                full = os.path.join(tmp, path)
                with open(full) as f:
                    text = f.read()
                self.assertIn(old, text)
                with open(full, "w") as f:
                    f.write(text.replace(old, new))
            os.chdir(tmp)
            try:
                ctx = Context(tmp)
                r = Report(io.StringIO())
                check_renders(ctx, r)
                return r.errors, ctx
            finally:
                os.chdir(old_cwd)

    def test_repository_renders_pass(self):
        errors, ctx = self.render_errors()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(ctx.rendered), ["base", "example", "example+mtls"])
        self.assertEqual([label for label, _ in renders(ctx)],
                         ["deploy/k8s/base", "deploy/k8s/overlays/example", "deploy/k8s/overlays/example+mtls"])

    def test_objects_outside_the_namespace_fail(self):
        errors, _ = self.render_errors("deploy/k8s/overlays/example/kustomization.yaml", "namespace: maitre", "namespace: other")
        self.assertTrue(any("outside namespace" in e for e in errors), errors)

    def test_a_patch_breaking_a_reference_fails(self):
        errors, _ = self.render_errors("deploy/k8s/overlays/example/patch-resources.yaml", "containers:",
                                       "serviceAccountName: nobody\n      containers:")
        self.assertTrue(errors)

    def test_an_unrenderable_overlay_fails(self):
        errors, ctx = self.render_errors("deploy/k8s/overlays/example/kustomization.yaml", "- namespace.yaml", "- gone.yaml")
        self.assertTrue(errors)
        self.assertNotIn("example", ctx.rendered)


if __name__ == "__main__":
    unittest.main()
