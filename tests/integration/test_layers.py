"""The source layout (README, "Source layout") is checked by scripts/check-layers: the tree
passes, each rule fails on a copy that breaks it (naming file, line and rule), and the
script's rank table is the README's list."""
import importlib.machinery
import importlib.util
import re
import shutil
import subprocess

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "check-layers"
README = (REPO_ROOT / "README.md").read_text()


def check(src):
    return subprocess.run([str(SCRIPT), str(src)], capture_output=True, text=True, timeout=60)


def ranks():
    loader = importlib.machinery.SourceFileLoader("check_layers", str(SCRIPT))
    spec = importlib.util.spec_from_loader("check_layers", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod.RANKS


def test_the_tree_keeps_its_layers():
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def broken_copy(tmp_path, rel, line):
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "src", src)
    path = src / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    path.write_text(old + line + "\n")
    return src, len(old.splitlines()) + 1


def test_an_include_of_a_folder_above_fails(tmp_path):
    src, n = broken_copy(tmp_path, "backend/backend.c", '#include "model/registry.h"')
    r = check(src)
    assert r.returncode == 1
    assert (f'src/backend/backend.c:{n}: #include "model/registry.h": backend (rank 5) '
            "includes model (rank 6), a folder above it") in r.stderr, r.stderr


def test_same_rank_folders_include_neither_the_other(tmp_path):
    for rel, inc, a, b in [("http/jobs.c", "worker/worker.h", "http", "worker"),
                           ("storage/storage.c", "notify/notify.h", "storage", "notify")]:
        src, n = broken_copy(tmp_path / a, rel, f'#include "{inc}"')
        r = check(src)
        assert r.returncode == 1
        assert (f'src/{rel}:{n}: #include "{inc}": {a} and {b} share rank') in r.stderr, r.stderr


def test_internal_headers_stay_in_their_folder(tmp_path):
    src, n = broken_copy(tmp_path, "worker/worker.c", '#include "queue/queue_internal.h"')
    r = check(src)
    assert r.returncode == 1
    assert f"src/worker/worker.c:{n}: " in r.stderr and "queue's internal header" in r.stderr


def test_a_folder_without_a_rank_fails(tmp_path):
    src, _ = broken_copy(tmp_path, "console/console.c", '#include "core/err.h"')
    r = check(src)
    assert r.returncode == 1 and "folder 'console' has no rank" in r.stderr, r.stderr


def test_the_plugin_abi_and_lower_folders_are_fine(tmp_path):
    src, _ = broken_copy(tmp_path, "core/err.c", '#include "inferd/backend.h"')
    assert check(src).returncode == 0
    src, _ = broken_copy(tmp_path / "b", "http/jobs.c", '#include "kserve/tensor.h"')
    assert check(src).returncode == 0


def test_the_readme_lists_the_same_ranks():
    section = README.split("## Source layout", 1)[1].split("\n## ", 1)[0]
    listed = {}
    for rank, folders in re.findall(r"^(\d+)\. ((?:`[^`]+`(?:, )?)+):", section, re.M):
        for f in re.findall(r"`([^`]+)`", folders):
            listed[f.removeprefix("src/").rstrip("/")] = int(rank)
    assert listed == ranks()
