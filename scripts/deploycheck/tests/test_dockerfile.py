import io
import unittest

from deploycheck.common import Report
from deploycheck.dockerfile import check_build_inputs
from deploycheck.tests.fixtures import repository, repository_file

DOCKERFILE = repository_file("deploy/Dockerfile")
CARGO = ('[workspace]\nmembers = [".", "runtime", "memory-service", "booking-service", "tests", "bench"]\n'
         '[workspace.package]\nrust-version = "1.94"\n'
         '[patch.crates-io]\napalis-postgres = { path = "patches/apalis-postgres" }\n')
# What the Dockerfile copies, as empty files.
SOURCES = ["Cargo.toml", "Cargo.lock", "build.rs", "proto/a.proto", "src/lib.rs",
           *(f"{m}/{f}" for m in ("runtime", "memory-service", "booking-service", "tests", "bench")
             for f in ("Cargo.toml", "src/lib.rs")),
           "memory-service/migrations/1.sql", "booking-service/migrations/1.sql", ".sqlx/query-1.json",
           "patches/apalis-postgres/Cargo.toml"]


def build_input_errors(dockerfile=DOCKERFILE, cargo=CARGO, missing=()):
    files = {p: "" for p in SOURCES if p not in missing}
    files.update({"Cargo.toml": cargo, "deploy/Dockerfile": dockerfile})
    with repository(files):
        r = Report(io.StringIO())
        check_build_inputs("deploy/Dockerfile", r)
        return r.errors


class BuildInputs(unittest.TestCase):
    def test_repository_dockerfile_passes(self):
        self.assertEqual(build_input_errors(), [])

    def test_each_broken_build_fails(self):
        cases = {
            "a member's Cargo.toml not copied": dict(dockerfile=DOCKERFILE.replace("COPY tests/Cargo.toml tests/\n", "")),
            "a new member not copied": dict(cargo=CARGO.replace('"bench"]', '"bench", "tools"]')),
            "COPY source missing": dict(missing=["build.rs"]),
            "a patched crate not copied": dict(dockerfile=DOCKERFILE.replace("COPY patches/ patches/\n", "")),
            "builder Rust too old": dict(cargo=CARGO.replace('"1.94"', '"1.99"')),
            "no RUST_VERSION": dict(dockerfile=DOCKERFILE.replace("ARG RUST_VERSION=", "ARG RUST=")),
            "unlocked build": dict(dockerfile=DOCKERFILE.replace("--locked", "")),
            "root at run time": dict(dockerfile=DOCKERFILE.replace("USER 10001:10001", "USER root")),
            "shell entrypoint": dict(dockerfile=DOCKERFILE + 'ENTRYPOINT ["/bin/sh", "-c"]\n'),
        }
        for what, kw in cases.items():
            with self.subTest(what):
                self.assertTrue(build_input_errors(**kw))


if __name__ == "__main__":
    unittest.main()
