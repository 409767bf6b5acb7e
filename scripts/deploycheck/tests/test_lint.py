import io
import unittest

from deploycheck.common import Report
from deploycheck.lint import check_yaml
from deploycheck.tests.fixtures import repository, repository_file


def yaml_errors(text):
    with repository({"deploy/.yamllint.yaml": repository_file("deploy/.yamllint.yaml"), "deploy/a.yaml": text}):
        r = Report(io.StringIO())
        check_yaml(None, r)
        return r.errors


class YamlLint(unittest.TestCase):
    def test_clean_and_broken_yaml(self):
        self.assertEqual(yaml_errors("---\nkey: value\n"), [])
        self.assertTrue(yaml_errors("---\nkey: value\nkey: again\n"))


if __name__ == "__main__":
    unittest.main()
