"""Tests of scripts/check-proto-breaking.sh on throw-away git repositories
holding a copy of proto/: a renamed field or a changed field number fails,
an added field passes, a missing commit fails (never skips).
python3 -m unittest discover -s scripts/tests -t scripts

Needs buf (scripts/install-tools.sh installs it; CI runs that first): skipped
when buf is not installed at all."""
import os
import re
import shutil
import subprocess
import tempfile
import unittest

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(SCRIPTS)
SCRIPT = os.path.join(SCRIPTS, "check-proto-breaking.sh")
PROTO = os.path.join(REPO, "proto")
PROTO_FILE = os.path.join("proto", "maitre", "memory", "v1", "memory.proto")
FREE_NUMBER = 536870900  # near the top of the field number range: unused

# `  [optional|repeated] Type name = 3 [opts];` - not map<...>, not enum values.
FIELD = re.compile(r"^(\s+)(?:optional |repeated )?[A-Za-z_][\w.]*\s+([a-z_]\w*)\s*=\s*(\d+)\s*(?:\[[^\]]*\])?\s*;",
                   re.MULTILINE)


def installed_buf():
    tools = os.environ.get("MAITRE_TOOLS_DIR") or os.path.join(os.environ.get("HOME") or "/root", ".cache", "maitre-tools")
    candidate = os.path.join(tools, "bin", "buf")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("buf")


def git_env():
    # No GIT_DIR & co. from a calling git (hooks), no global config needed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def git(repo, *args):
    return subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t",
                           "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
                          env=git_env(), check=True, capture_output=True, text=True).stdout


def first_field(text):
    m = FIELD.search(text)
    if m is None:
        raise AssertionError(f"no field found in {PROTO_FILE}")
    return m


BUF = installed_buf()


@unittest.skipIf(BUF is None, "buf is not installed (run scripts/install-tools.sh); cannot run buf breaking")
class ProtoBreaking(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="proto-breaking-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.repo = os.path.join(self.tmp, "repo")
        os.mkdir(self.repo)
        git(self.repo, "init", "--quiet")
        shutil.copytree(PROTO, os.path.join(self.repo, "proto"))
        self.commit("protos as they are")
        self.path = os.path.join(self.repo, PROTO_FILE)
        with open(self.path, encoding="utf-8") as f:
            self.original = f.read()
        self.field = first_field(self.original)

    def commit(self, message):
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "--quiet", "-m", message)

    def edit(self, new_text):
        self.assertNotEqual(new_text, self.original)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(new_text)

    def replace_field_line(self, new_line):
        m = self.field
        end = self.original.index("\n", m.start())
        return self.original[:m.start()] + new_line + self.original[end:]

    def run_check(self, repo=None, against=None, history=None):
        env = git_env()
        env["PROTO_ROOT"] = repo or self.repo
        env.pop("PROTO_BREAKING_AGAINST", None)
        env.pop("PROTO_BREAKING_HISTORY", None)
        if against is not None:
            env["PROTO_BREAKING_AGAINST"] = against
        if history is not None:
            env["PROTO_BREAKING_HISTORY"] = history
        p = subprocess.run([SCRIPT], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout + p.stderr

    def test_renamed_field_fails(self):
        line = self.original[self.field.start():self.original.index("\n", self.field.start())]
        name = self.field.group(2)
        self.edit(self.replace_field_line(line.replace(f" {name} ", f" {name}_renamed ", 1)))
        self.commit("rename a field")
        rc, out = self.run_check(against="HEAD~1")
        self.assertNotEqual(rc, 0, out)
        self.assertIn(f'changed name from "{name}" to "{name}_renamed"', out)
        self.assertIn("buf breaking reported breaking changes", out)

    def test_changed_field_number_fails(self):
        line = self.original[self.field.start():self.original.index("\n", self.field.start())]
        number = self.field.group(3)
        new_line = re.sub(rf"=\s*{number}\b", f"= {FREE_NUMBER}", line, count=1)
        self.edit(self.replace_field_line(new_line))
        self.commit("renumber a field")
        rc, out = self.run_check()  # default: HEAD~1
        self.assertNotEqual(rc, 0, out)
        self.assertRegex(out, rf'Previously present field "{number}" with name "{self.field.group(2)}" .*was deleted')

    def test_added_field_passes(self):
        indent = self.field.group(1)
        end = self.original.index("\n", self.field.start())
        added = f"\n{indent}string added_by_test = {FREE_NUMBER};"
        self.edit(self.original[:end] + added + self.original[end:])
        self.commit("add a field")
        rc, out = self.run_check(against="HEAD~1")
        self.assertEqual(rc, 0, out)
        self.assertIn("ok: no breaking changes", out)
        self.assertIn("protos as they are", out)  # logs the commit compared against

    def test_a_break_hidden_by_a_later_commit_is_caught(self):
        # Commit 2 removes a field, commit 3 puts it back under a new number:
        # commit 3 alone against commit 2 only adds a field.
        line = self.original[self.field.start():self.original.index("\n", self.field.start())]
        self.edit(self.replace_field_line(""))
        self.commit("remove a field")
        new_line = re.sub(rf"=\s*{self.field.group(3)}\b", f"= {FREE_NUMBER}", line, count=1)
        self.edit(self.replace_field_line(new_line))
        self.commit("bring it back under another number")
        rc, out = self.run_check(history="off")
        self.assertEqual(rc, 0, out)
        rc, out = self.run_check()  # default: every earlier commit that changed proto/
        self.assertNotEqual(rc, 0, out)
        self.assertIn("protos as they are", out)

    def test_uncommitted_change_is_checked(self):
        name = self.field.group(2)
        line = self.original[self.field.start():self.original.index("\n", self.field.start())]
        self.edit(self.replace_field_line(line.replace(f" {name} ", f" {name}_renamed ", 1)))
        rc, out = self.run_check(against="HEAD")  # working tree vs the last commit
        self.assertNotEqual(rc, 0, out)
        self.assertIn(f'changed name from "{name}"', out)

    def test_missing_commit_fails_with_advice(self):
        rc, out = self.run_check()  # a single commit: HEAD~1 does not exist
        self.assertNotEqual(rc, 0, out)
        self.assertIn("not found", out)
        self.assertIn("PROTO_BREAKING_AGAINST", out)

    def test_shallow_clone_is_deepened(self):
        self.edit(self.replace_field_line(self.original[self.field.start():self.original.index("\n", self.field.start())]
                                          .replace(f" {self.field.group(2)} ", f" {self.field.group(2)}_renamed ", 1)))
        self.commit("rename a field")
        clone = os.path.join(self.tmp, "clone")
        subprocess.run(["git", "clone", "--quiet", "--depth=1", "file://" + self.repo, clone],
                       env=git_env(), check=True, capture_output=True)
        self.assertEqual(git(clone, "rev-parse", "--is-shallow-repository").strip(), "true")
        rc, out = self.run_check(repo=clone)
        self.assertIn("trying git fetch --deepen=1", out)
        self.assertNotEqual(rc, 0, out)
        self.assertIn("changed name from", out)


if __name__ == "__main__":
    unittest.main()
