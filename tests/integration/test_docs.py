"""The README is the user's manual: every command-line option and every config.json key
must be documented there, and the --help texts must work."""
import re
import subprocess

from conftest import INFERD_BIN, REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def run(*args):
    return subprocess.run([str(INFERD_BIN), *args], capture_output=True, text=True, timeout=30)


def test_help_and_version():
    r = run("--version")
    assert r.returncode == 0 and re.match(r"inferd \d+\.\d+\.\d+", r.stdout), r.stdout
    r = run("--help")
    assert r.returncode == 0 and "serve" in r.stdout
    r = run("serve", "--help")
    assert r.returncode == 0 and "--models" in r.stdout
    r = run("nosuchcommand")
    assert r.returncode != 0 and "unknown command 'nosuchcommand'" in r.stderr


def test_every_option_is_in_the_readme():
    for command in ("serve", "worker", "batch"):
        options = re.findall(r"^\s+--([a-z0-9-]+)", run(command, "--help").stdout, re.M)
        assert len(options) >= 5, options
        for opt in options:
            assert f"`--{opt}`" in README, f"{command} --{opt} is missing from the README"


def test_bad_option_values_name_the_option_and_bound():
    r = run("serve", "--port", "70000")
    assert r.returncode == 2 and "--port: 70000 is above the maximum 65535" in r.stderr
    r = run("serve", "--max-body-bytes", "abc")
    assert r.returncode == 2 and "--max-body-bytes: 'abc' is not an integer" in r.stderr
    r = run("serve", "--nope", "1")
    assert r.returncode == 2 and "unknown option '--nope'" in r.stderr


def test_every_config_key_is_in_the_readme():
    src = (REPO_ROOT / "src" / "model" / "registry.c").read_text()
    block = re.search(r"static const char \*known\[\] = \{(.*?)\};", src, re.S).group(1)
    keys = re.findall(r'"([a-z_]+)"', block)
    assert "max_batch_size" in keys
    for key in keys:
        if key in ("name", "platform"):  # accepted for Triton compatibility, ignored
            continue
        assert f"`{key}`" in README, f"config.json key {key} is missing from the README"
