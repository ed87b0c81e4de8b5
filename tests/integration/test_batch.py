"""``inferd batch``: batch transform over files (file:// URIs and plain paths).

Every test runs the command line as a subprocess (a private copy of the binary,
so a rebuild of build/inferd mid-run does not matter) and checks the files it
writes: one ``<name>.out`` per input object with one line per record, in input
order, ``<name>.errors`` for tolerated bad records, ``_manifest.json`` and
``_SUCCESS`` for resuming. Predictions are compared with python-xgboost
(``conftest.ATOL``).

Nothing here asserts on elapsed time; the kill -9 test polls the output folder
against a deadline.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import INFERD_BIN, assert_close

RUN_DEADLINE_S = 180.0   # one `inferd batch` run; generous, the box is noisy
RESERVED_NAMES = ("_manifest.json", "_SUCCESS")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inferd(tmp_path_factory):
    """A private copy of build/inferd for this module."""
    if not INFERD_BIN.exists():
        pytest.fail(f"{INFERD_BIN} does not exist; build it first (make)")
    dst = tmp_path_factory.mktemp("batch-bin") / "inferd-under-test"
    shutil.copy2(INFERD_BIN, dst)
    return dst


@pytest.fixture
def batch(inferd, tmp_path):
    """``batch(repo, model, input, output, *extra, check=True)`` -> Result.

    ``check=True`` asserts exit status 0 (with the command and stderr in the message).
    """
    def run(repo, model, inp, out, *extra, check=True, deadline_s=RUN_DEADLINE_S):
        cmd = [str(inferd), "batch", "--models", str(repo), "--model", model,
               "--input", str(inp), "--output", str(out), *[str(a) for a in extra]]
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=str(tmp_path), timeout=deadline_s)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"inferd batch did not finish within {deadline_s:.0f}s\n"
                        f"command: {' '.join(cmd)}\n--- stderr ---\n"
                        f"{(exc.stderr or b'').decode('utf-8', 'replace')[-4000:]}")
        res = Result(cmd, p.returncode, p.stdout.decode("utf-8", "replace"),
                     p.stderr.decode("utf-8", "replace"))
        if check:
            assert res.rc == 0, f"exit status {res.rc} (expected 0)\n{res}"
        return res
    return run


class Result:
    def __init__(self, cmd, rc, stdout, stderr):
        self.cmd, self.rc, self.stdout, self.stderr = cmd, rc, stdout, stderr

    def __str__(self):
        return (f"command: {' '.join(self.cmd)}\nexit status: {self.rc}\n"
                f"--- stderr (tail) ---\n{self.stderr[-3000:]}\n"
                f"--- stdout (tail) ---\n{self.stdout[-1000:]}")

    def summary(self):
        """(records, errors) of the final summary line (the last line naming both)."""
        lines = [l for l in self.stderr.splitlines() if "records=" in l and "errors=" in l]
        assert lines, f"no summary line with records= and errors= on stderr\n{self}"
        rec = re.search(r"records=(\d+)", lines[-1])
        err = re.search(r"errors=(\d+)", lines[-1])
        assert rec and err, f"summary line without numbers: {lines[-1]!r}\n{self}"
        return int(rec.group(1)), int(err.group(1))

    def line_naming(self, *needles):
        """The first stderr line containing every needle (a str, or a compiled regex)."""
        for line in self.stderr.splitlines():
            if all((n.search(line) if isinstance(n, re.Pattern) else n in line) for n in needles):
                return line
        return None


def fmt(v):
    """A float32 value as text that parses back to the same float32."""
    return repr(float(v))


def jsonl_text(X):
    return "".join(json.dumps([None if np.isnan(v) else float(v) for v in row]) + "\n"
                   for row in np.asarray(X))


def csv_text(X, header=False):
    n = np.asarray(X).shape[1]
    head = ",".join(f"f{i}" for i in range(n)) + "\n" if header else ""
    return head + "".join(",".join("" if np.isnan(v) else fmt(v) for v in row) + "\n"
                          for row in np.asarray(X))


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def out_lines(path):
    """Lines of an output file (each must end with a newline)."""
    path = Path(path)
    assert path.exists(), f"{path} was not written; folder has " \
                          f"{sorted(str(p.relative_to(path.parent)) for p in path.parent.rglob('*'))}"
    text = path.read_text()
    if not text:
        return []
    assert text.endswith("\n"), f"{path}: last line has no newline: {text[-80:]!r}"
    return text[:-1].split("\n")


def parse_numbers(lines, n_outputs, mode, what):
    """Predictions of .out lines as an array ([n] or [n, c]); mode is jsonl or csv."""
    vals = []
    for i, line in enumerate(lines, 1):
        try:
            if n_outputs == 1:
                v = json.loads(line) if mode == "jsonl" else float(line)
                assert isinstance(v, (int, float)) and not isinstance(v, bool), v
                vals.append(float(v))
            elif mode == "jsonl":
                v = json.loads(line)
                assert isinstance(v, list) and len(v) == n_outputs, v
                vals.append([float(x) for x in v])
            else:
                parts = line.split(",")
                assert len(parts) == n_outputs, parts
                vals.append([float(x) for x in parts])
        except (ValueError, AssertionError) as exc:
            pytest.fail(f"{what}: line {i} {line!r} is not a {mode} prediction "
                        f"with {n_outputs} value(s): {exc}")
    return np.asarray(vals, dtype=np.float64)


def check_predictions(path, model, X, mode, header=None):
    """``header``: the output's first line, for a CSV input with a header line."""
    lines = out_lines(path)
    if header is not None:
        assert lines and lines[0] == header, f"{path}: first line {lines[:1]!r}, not {header!r}"
        lines = lines[1:]
    assert len(lines) == len(X), f"{path}: {len(lines)} lines for {len(X)} records"
    got = parse_numbers(lines, model.n_outputs, mode, str(path))
    assert_close(got, model.expected(X), str(path))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest(out_dir):
    p = Path(out_dir) / "_manifest.json"
    assert p.exists(), f"{p} missing"
    m = json.loads(p.read_text())
    assert isinstance(m, dict) and isinstance(m.get("objects"), dict), f"manifest: {m!r}"
    return m


def check_manifest(out_dir, names_records):
    """The manifest lists exactly these objects with their record counts and .out hashes."""
    objs = manifest(out_dir)["objects"]
    assert sorted(objs) == sorted(names_records), \
        f"manifest objects {sorted(objs)} != {sorted(names_records)}"
    for name, n in names_records.items():
        entry = objs[name]
        assert entry.get("records") == n, f"manifest {name}: records {entry.get('records')!r} != {n}"
        assert entry.get("sha256") == sha256(Path(out_dir) / f"{name}.out"), \
            f"manifest {name}: sha256 {entry.get('sha256')!r} does not match the .out file"


def files_under(d):
    d = Path(d)
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def snapshot(d):
    """{relative path: (bytes, mtime_ns, inode)} of every file under d."""
    d = Path(d)
    snap = {}
    for rel in files_under(d):
        st = (d / rel).stat()
        snap[rel] = ((d / rel).read_bytes(), st.st_mtime_ns, st.st_ino)
    return snap


def num57(n=57):
    return re.compile(rf"(?<!\d){n}(?!\d)")


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch-models")
    for name in ("binary", "regression", "multiclass", "slow"):
        trained[name].install(d)
    return d


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------


def test_jsonl_folder_end_to_end(batch, repo, trained, tmp_path):
    m = trained["binary"]
    inp, out = tmp_path / "in", tmp_path / "out"
    data = {"a.jsonl": m.rows(1000, seed=1), "sub/b.jsonl": m.rows(500, seed=2),
            "c.jsonl": m.rows(1, seed=3)}
    for name, X in data.items():
        write(inp / name, jsonl_text(X))
    res = batch(repo, "binary", f"file://{inp}", f"file://{out}")
    for name, X in data.items():
        check_predictions(out / f"{name}.out", m, X, "jsonl")
    check_manifest(out, {name: len(X) for name, X in data.items()})
    assert (out / "_SUCCESS").exists(), f"_SUCCESS missing; out has {files_under(out)}"
    assert res.summary() == (1501, 0), res


def test_single_file_plain_path_uses_basename(batch, repo, trained, tmp_path):
    m = trained["binary"]
    X = m.rows(37, seed=4)
    src = write(tmp_path / "deep" / "dir" / "one.jsonl", jsonl_text(X))
    out = tmp_path / "out"
    batch(repo, "binary", src, out)
    check_predictions(out / "one.jsonl.out", m, X, "jsonl")
    check_manifest(out, {"one.jsonl": 37})
    assert (out / "_SUCCESS").exists()


def test_single_file_file_uri(batch, repo, trained, tmp_path):
    m = trained["regression"]
    X = m.rows(20, seed=5)
    src = write(tmp_path / "r.jsonl", jsonl_text(X))
    out = tmp_path / "out"
    batch(repo, "regression", f"file://{src}", f"file://{out}")
    check_predictions(out / "r.jsonl.out", m, X, "jsonl")


def test_reserved_names_are_not_inputs(batch, repo, trained, tmp_path):
    """_manifest.json, _SUCCESS, *.out and *.errors under the input are skipped."""
    m = trained["binary"]
    inp, out = tmp_path / "in", tmp_path / "out"
    X = m.rows(10, seed=6)
    write(inp / "a.jsonl", jsonl_text(X))
    write(inp / "_manifest.json", '{"objects": {}}\n')
    write(inp / "_SUCCESS", "")
    write(inp / "old.jsonl.out", "0.5\n")
    write(inp / "old.jsonl.errors", "line 1: bad\n")
    write(inp / "sub" / "_SUCCESS", "")
    batch(repo, "binary", inp, out)
    check_predictions(out / "a.jsonl.out", m, X, "jsonl")
    check_manifest(out, {"a.jsonl": 10})
    outs = [f for f in files_under(out) if f.endswith(".out")]
    assert outs == ["a.jsonl.out"], f"unexpected outputs {outs}"


def test_json_extension_and_format_flag(batch, repo, trained, tmp_path):
    """.json is JSON Lines; an unknown extension needs --format (else an error naming it)."""
    m = trained["binary"]
    X = m.rows(15, seed=7)
    j = write(tmp_path / "in1" / "x.json", jsonl_text(X))
    batch(repo, "binary", j, tmp_path / "o1")
    check_predictions(tmp_path / "o1" / "x.json.out", m, X, "jsonl")

    t = write(tmp_path / "in2" / "rows.txt", csv_text(X))
    res = batch(repo, "binary", t, tmp_path / "o2", check=False)
    assert res.rc != 0, f"unknown extension without --format accepted\n{res}"
    assert res.line_naming("rows.txt"), f"no stderr line names rows.txt\n{res}"

    batch(repo, "binary", t, tmp_path / "o3", "--format", "csv")
    check_predictions(tmp_path / "o3" / "rows.txt.out", m, X, "csv")

    # --format overrides the extension: CSV text in a .jsonl file
    c = write(tmp_path / "in4" / "really_csv.jsonl", csv_text(X))
    batch(repo, "binary", c, tmp_path / "o4", "--format", "csv")
    check_predictions(tmp_path / "o4" / "really_csv.jsonl.out", m, X, "csv")


@pytest.mark.parametrize("header", [False, True], ids=["no-header", "csv-header"])
def test_csv_regression(batch, repo, trained, tmp_path, header):
    m = trained["regression"]
    X1, X2 = m.rows(300, seed=8), m.rows(41, seed=9)
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "p.csv", csv_text(X1, header))
    write(inp / "q" / "r.csv", csv_text(X2, header))
    args = ["--csv-header"] if header else []
    res = batch(repo, "regression", inp, out, *args)
    # with a header in, a header out: the output stays line-aligned with its input
    check_predictions(out / "p.csv.out", m, X1, "csv", "prediction" if header else None)
    check_predictions(out / "q" / "r.csv.out", m, X2, "csv", "prediction" if header else None)
    check_manifest(out, {"p.csv": 300, "q/r.csv": 41})
    assert res.summary() == (341, 0), res


def test_csv_header_line_without_flag_is_a_bad_record(batch, repo, trained, tmp_path):
    m = trained["regression"]
    src = write(tmp_path / "h.csv", csv_text(m.rows(5, seed=10), header=True))
    res = batch(repo, "regression", src, tmp_path / "out", check=False)
    assert res.rc != 0, f"a header line was accepted as a record without --csv-header\n{res}"
    assert res.line_naming("h.csv", num57(1)), f"no stderr line names h.csv and line 1\n{res}"


@pytest.mark.parametrize("mode", ["csv", "jsonl"])
def test_multiclass_outputs(batch, repo, trained, tmp_path, mode):
    m = trained["multiclass"]
    X = m.rows(200, seed=11)
    name = f"mc.{mode}"
    src = write(tmp_path / name, csv_text(X) if mode == "csv" else jsonl_text(X))
    out = tmp_path / "out"
    batch(repo, "multiclass", src, out)
    lines = out_lines(out / f"{name}.out")
    if mode == "jsonl":
        assert lines[0].startswith("[") and lines[0].endswith("]"), lines[0]
    else:
        assert lines[0].count(",") == 2 and "[" not in lines[0], lines[0]
    check_predictions(out / f"{name}.out", m, X, mode)


# ---------------------------------------------------------------------------
# --join-input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["binary", "multiclass"])
def test_join_input_jsonl(batch, repo, trained, tmp_path, model_name):
    m = trained[model_name]
    X = m.rows(120, seed=12)
    src = write(tmp_path / "j.jsonl", jsonl_text(X))
    out = tmp_path / "out"
    batch(repo, model_name, src, out, "--join-input")
    lines = out_lines(out / "j.jsonl.out")
    assert len(lines) == len(X), f"{len(lines)} lines for {len(X)} records"
    preds = []
    for i, line in enumerate(lines):
        obj = json.loads(line)
        assert isinstance(obj, dict) and set(obj) == {"input", "prediction"}, \
            f"line {i + 1}: {line!r}"
        got_in = np.asarray(obj["input"], dtype=np.float64).astype(np.float32)
        assert got_in.shape == X[i].shape and np.array_equal(got_in, X[i]), \
            f"line {i + 1}: input {obj['input']!r} != row {X[i].tolist()!r}"
        p = obj["prediction"]
        if m.n_outputs == 1:
            assert isinstance(p, (int, float)) and not isinstance(p, bool), f"line {i + 1}: {p!r}"
        else:
            assert isinstance(p, list) and len(p) == m.n_outputs, f"line {i + 1}: {p!r}"
        preds.append(p)
    assert_close(np.asarray(preds, dtype=np.float64), m.expected(X), "joined predictions")


@pytest.mark.parametrize("model_name", ["regression", "multiclass"])
def test_join_input_csv(batch, repo, trained, tmp_path, model_name):
    m = trained[model_name]
    X = m.rows(120, seed=13)
    src = write(tmp_path / "j.csv", csv_text(X))
    out = tmp_path / "out"
    batch(repo, model_name, src, out, "--join-input")
    lines = out_lines(out / "j.csv.out")
    assert len(lines) == len(X), f"{len(lines)} lines for {len(X)} records"
    width = m.n_features + m.n_outputs
    rows = []
    for i, line in enumerate(lines):
        parts = line.split(",")
        assert len(parts) == width, \
            f"line {i + 1} has {len(parts)} columns, expected {m.n_features} inputs + " \
            f"{m.n_outputs} prediction(s): {line!r}"
        rows.append([float(x) for x in parts])
    rows = np.asarray(rows, dtype=np.float64)
    got_in = rows[:, :m.n_features].astype(np.float32)
    assert np.array_equal(got_in, X), "input columns do not echo the rows"
    got_p = rows[:, m.n_features:]
    assert_close(got_p.reshape(m.expected(X).shape), m.expected(X), "joined predictions")


# ---------------------------------------------------------------------------
# missing values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["jsonl", "csv"])
def test_missing_values(batch, repo, trained, tmp_path, mode):
    m = trained["binary"]
    X = m.rows(400, seed=14, nan_fraction=0.25)
    X[5, :] = np.nan          # an all-missing record
    X[6, 0] = np.nan          # missing first ...
    X[7, -1] = np.nan         # ... and last column
    assert np.isnan(X).any()
    name = f"nan.{mode}"
    src = write(tmp_path / name, jsonl_text(X) if mode == "jsonl" else csv_text(X))
    if mode == "csv":
        assert ",," in src.read_text() or "\n," in src.read_text()
    out = tmp_path / "out"
    batch(repo, "binary", src, out)
    check_predictions(out / f"{name}.out", m, X, mode)


# ---------------------------------------------------------------------------
# bad records
# ---------------------------------------------------------------------------

N_ROWS = 100


def bad_jsonl(X, bad_lines, kind):
    """JSON Lines of X with record lines ``bad_lines`` (1-based) broken by ``kind``."""
    lines = jsonl_text(X).splitlines()
    n = X.shape[1]
    for ln in bad_lines:
        row = [float(v) for v in X[ln - 1]]
        if kind == "string":
            row[2] = "abc"
            lines[ln - 1] = json.dumps(row)
        elif kind == "short":
            lines[ln - 1] = json.dumps(row[:n - 1])
        elif kind == "long":
            lines[ln - 1] = json.dumps(row + [1.0])
        elif kind == "object":
            lines[ln - 1] = json.dumps({"x": row})
        elif kind == "not-json":
            lines[ln - 1] = json.dumps(row)[:-3]
        elif kind == "nested":
            lines[ln - 1] = json.dumps([row])
        else:
            raise AssertionError(kind)
    return "\n".join(lines) + "\n"


def bad_csv(X, bad_lines, kind, header=False):
    """CSV of X with *file* lines ``bad_lines`` (1-based, counting the header) broken."""
    lines = csv_text(X, header).splitlines()
    for ln in bad_lines:
        parts = lines[ln - 1].split(",")
        if kind == "string":
            parts[2] = "abc"
        elif kind == "short":
            parts = parts[:-1]
        elif kind == "long":
            parts = parts + ["1.0"]
        elif kind == "trailing-garbage":
            parts[0] = parts[0] + "x"
        else:
            raise AssertionError(kind)
        lines[ln - 1] = ",".join(parts)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", ["string", "short", "long", "object", "not-json", "nested"])
def test_bad_jsonl_record_default_fails(batch, repo, trained, tmp_path, kind):
    m = trained["binary"]
    X = m.rows(N_ROWS, seed=15)
    src = write(tmp_path / "in" / "bad.jsonl", bad_jsonl(X, [57], kind))
    out = tmp_path / "out"
    res = batch(repo, "binary", src, out, check=False)
    assert res.rc != 0, f"bad record ({kind}) at line 57 accepted\n{res}"
    line = res.line_naming("bad.jsonl", num57())
    assert line, f"no stderr line names bad.jsonl and line 57\n{res}"
    assert not (out / "bad.jsonl.out").exists(), "a partial .out exists under its final name"
    assert not (out / "_SUCCESS").exists(), "_SUCCESS written for a failed job"


@pytest.mark.parametrize("kind", ["string", "short", "long", "trailing-garbage"])
def test_bad_csv_record_default_fails(batch, repo, trained, tmp_path, kind):
    m = trained["binary"]
    X = m.rows(N_ROWS, seed=16)
    src = write(tmp_path / "in" / "bad.csv", bad_csv(X, [57], kind))
    out = tmp_path / "out"
    res = batch(repo, "binary", src, out, check=False)
    assert res.rc != 0, f"bad CSV record ({kind}) at line 57 accepted\n{res}"
    assert res.line_naming("bad.csv", num57()), f"no stderr line names bad.csv and line 57\n{res}"
    assert not (out / "bad.csv.out").exists(), "a partial .out exists under its final name"
    assert not (out / "_SUCCESS").exists()


def check_tolerated(out_dir, name, m, X, bad_record_idx, bad_file_lines, mode="jsonl",
                    header=None):
    """.out: empty lines at bad records, right predictions elsewhere; .errors names them."""
    lines = out_lines(Path(out_dir) / f"{name}.out")
    if header is not None:
        assert lines and lines[0] == header, f"{name}.out: first line {lines[:1]!r}"
        lines = lines[1:]
    assert len(lines) == len(X), f"{name}.out: {len(lines)} lines for {len(X)} records"
    for i in bad_record_idx:
        assert lines[i] == "", f"{name}.out line {i + 1} (a bad record) is {lines[i]!r}, not empty"
    good = [i for i in range(len(X)) if i not in set(bad_record_idx)]
    for i in good:
        assert lines[i] != "", f"{name}.out line {i + 1} (a good record) is empty"
    got = parse_numbers([lines[i] for i in good], m.n_outputs, mode, f"{name}.out")
    assert_close(got, m.expected(X[good]), f"{name}.out good lines")
    errs_path = Path(out_dir) / f"{name}.errors"
    assert errs_path.exists(), f"{errs_path} missing; out has {files_under(out_dir)}"
    errs = [l for l in errs_path.read_text().splitlines() if l.strip()]
    assert len(errs) == len(bad_file_lines), f"{name}.errors: {errs!r}"
    for e, ln in zip(errs, sorted(bad_file_lines)):
        assert e.startswith(f"line {ln}:"), f"{name}.errors line {e!r} does not start 'line {ln}:'"
        assert len(e) > len(f"line {ln}:") + 1, f"{name}.errors line {e!r} has no reason"


def test_max_errors_tolerates_one_bad_jsonl_record(batch, repo, trained, tmp_path):
    m = trained["binary"]
    X = m.rows(N_ROWS, seed=17)
    src = write(tmp_path / "in" / "bad.jsonl", bad_jsonl(X, [57], "string"))
    out = tmp_path / "out"
    res = batch(repo, "binary", src, out, "--max-errors", "5")
    check_tolerated(out, "bad.jsonl", m, X, [56], [57])
    assert (out / "_SUCCESS").exists()
    assert manifest(out)["objects"]["bad.jsonl"]["sha256"] == sha256(out / "bad.jsonl.out")
    assert res.summary()[1] == 1, f"summary errors != 1\n{res}"


def test_max_errors_csv_with_header_counts_header_line(batch, repo, trained, tmp_path):
    """Line numbers count the header: file line 57 is record 56."""
    m = trained["binary"]
    X = m.rows(N_ROWS, seed=18)
    src = write(tmp_path / "in" / "bad.csv", bad_csv(X, [57], "short", header=True))
    out = tmp_path / "out"
    batch(repo, "binary", src, out, "--csv-header", "--max-errors", "5")
    check_tolerated(out, "bad.csv", m, X, [55], [57], mode="csv", header="prediction")

    res = batch(repo, "binary", src, tmp_path / "out-strict", "--csv-header", check=False)
    assert res.rc != 0, f"bad record accepted by default\n{res}"
    assert res.line_naming("bad.csv", num57()), \
        f"no stderr line names bad.csv and line 57 (counting the header)\n{res}"


def test_max_errors_five_of_five_ok_six_fails(batch, repo, trained, tmp_path):
    m = trained["binary"]
    X = m.rows(N_ROWS, seed=19)
    five = [3, 20, 57, 58, 100]
    src5 = write(tmp_path / "in5" / "five.jsonl", bad_jsonl(X, five, "short"))
    out5 = tmp_path / "out5"
    res = batch(repo, "binary", src5, out5, "--max-errors", "5")
    check_tolerated(out5, "five.jsonl", m, X, [i - 1 for i in five], five)
    assert res.summary()[1] == 5, res

    six = [3, 20, 57, 58, 90, 100]
    src6 = write(tmp_path / "in6" / "six.jsonl", bad_jsonl(X, six, "short"))
    out6 = tmp_path / "out6"
    res = batch(repo, "binary", src6, out6, "--max-errors", "5", check=False)
    assert res.rc != 0, f"6 bad records accepted with --max-errors 5\n{res}"
    assert not (out6 / "_SUCCESS").exists(), "_SUCCESS written for a failed job"


def test_max_errors_counts_the_whole_job(batch, repo, trained, tmp_path):
    """The budget is per job, not per object: 3 + 3 bad records exceed --max-errors 5."""
    m = trained["binary"]
    X = m.rows(N_ROWS, seed=20)
    inp = tmp_path / "in"
    write(inp / "a.jsonl", bad_jsonl(X, [10, 57, 99], "string"))
    write(inp / "b.jsonl", bad_jsonl(X, [1, 2, 57], "object"))
    res = batch(repo, "binary", inp, tmp_path / "out", "--max-errors", "5", check=False)
    assert res.rc != 0, f"6 bad records in two objects accepted with --max-errors 5\n{res}"
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    # 3 + 2 is within the budget
    inp2 = tmp_path / "in2"
    write(inp2 / "a.jsonl", bad_jsonl(X, [10, 57, 99], "string"))
    write(inp2 / "b.jsonl", bad_jsonl(X, [1, 57], "object"))
    out2 = tmp_path / "out2"
    res = batch(repo, "binary", inp2, out2, "--max-errors", "5")
    check_tolerated(out2, "a.jsonl", m, X, [9, 56, 98], [10, 57, 99])
    check_tolerated(out2, "b.jsonl", m, X, [0, 56], [1, 57])
    assert res.summary() == (2 * N_ROWS, 5), res


# ---------------------------------------------------------------------------
# command-level errors
# ---------------------------------------------------------------------------


def test_missing_input_file(batch, repo, tmp_path):
    missing = tmp_path / "nowhere" / "x.jsonl"
    res = batch(repo, "binary", missing, tmp_path / "out", check=False)
    assert res.rc != 0, f"missing input accepted\n{res}"
    assert res.line_naming(str(missing)) or res.line_naming("x.jsonl"), \
        f"no stderr line names the missing input\n{res}"
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    res = batch(repo, "binary", f"file://{missing}", tmp_path / "out", check=False)
    assert res.rc != 0, f"missing file:// input accepted\n{res}"
    assert res.line_naming("x.jsonl"), f"no stderr line names the missing input\n{res}"


def test_unknown_model(batch, repo, trained, tmp_path):
    src = write(tmp_path / "a.jsonl", jsonl_text(trained["binary"].rows(3, seed=21)))
    res = batch(repo, "no_such_model", src, tmp_path / "out", check=False)
    assert res.rc != 0, f"unknown model accepted\n{res}"
    assert res.line_naming("no_such_model"), f"no stderr line names the model\n{res}"
    assert not (tmp_path / "out" / "a.jsonl.out").exists()
    assert not (tmp_path / "out" / "_SUCCESS").exists()


# ---------------------------------------------------------------------------
# batching options do not change the output
# ---------------------------------------------------------------------------


def test_records_per_batch_and_concurrency_do_not_change_output(batch, repo, trained, tmp_path):
    m = trained["multiclass"]
    inp = tmp_path / "in"
    for i, n in enumerate([700, 1, 333, 64, 65]):
        write(inp / f"f{i}.jsonl", jsonl_text(m.rows(n, seed=30 + i)))
    batch(repo, "multiclass", inp, tmp_path / "o-default")
    batch(repo, "multiclass", inp, tmp_path / "o-small", "--records-per-batch", "7",
          "--concurrency", "3")
    batch(repo, "multiclass", inp, tmp_path / "o-one", "--records-per-batch", "1",
          "--concurrency", "1")
    for i in range(5):
        a = (tmp_path / "o-default" / f"f{i}.jsonl.out").read_bytes()
        assert (tmp_path / "o-small" / f"f{i}.jsonl.out").read_bytes() == a, f"f{i} differs (7/3)"
        assert (tmp_path / "o-one" / f"f{i}.jsonl.out").read_bytes() == a, f"f{i} differs (1/1)"
    check_predictions(tmp_path / "o-default" / "f0.jsonl.out", m, m.rows(700, seed=30), "jsonl")


# ---------------------------------------------------------------------------
# re-runs and resume
# ---------------------------------------------------------------------------


def test_rerun_of_completed_job_is_a_noop(batch, repo, trained, tmp_path):
    m = trained["binary"]
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "a.jsonl", jsonl_text(m.rows(200, seed=40)))
    write(inp / "b" / "c.jsonl", jsonl_text(m.rows(50, seed=41)))
    batch(repo, "binary", inp, out)
    before = snapshot(out)
    m_before = manifest(out)["objects"]
    res = batch(repo, "binary", inp, out)
    after = snapshot(out)
    assert manifest(out)["objects"] == m_before, "manifest objects changed on a no-op re-run"
    assert "_SUCCESS" in after, "_SUCCESS gone after the re-run"
    for name in ("a.jsonl.out", "b/c.jsonl.out"):
        assert name in after, f"{name} gone after the re-run"
        assert after[name][0] == before[name][0], f"{name} content changed"
        assert after[name][1:] == before[name][1:], \
            f"{name} was rewritten (mtime/inode changed) on a no-op re-run\n{res}"
    assert [f for f in after if f.endswith(".out")] == [f for f in before if f.endswith(".out")]


def test_rerun_redoes_an_object_whose_out_changed(batch, repo, trained, tmp_path):
    m = trained["binary"]
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "a.jsonl", jsonl_text(m.rows(200, seed=42)))
    write(inp / "b.jsonl", jsonl_text(m.rows(50, seed=43)))
    batch(repo, "binary", inp, out)
    good_a = (out / "a.jsonl.out").read_bytes()
    b_stat = (out / "b.jsonl.out").stat()
    (out / "a.jsonl.out").write_bytes(good_a[: len(good_a) // 2])   # damaged
    res = batch(repo, "binary", inp, out)
    assert (out / "a.jsonl.out").read_bytes() == good_a, \
        f"a damaged .out was not redone on re-run\n{res}"
    st = (out / "b.jsonl.out").stat()
    assert (st.st_mtime_ns, st.st_ino) == (b_stat.st_mtime_ns, b_stat.st_ino), \
        "an intact .out was rewritten on re-run"
    check_manifest(out, {"a.jsonl": 200, "b.jsonl": 50})
    assert (out / "_SUCCESS").exists()


RESUME_FILES = [("a.jsonl", 5_000), ("b.jsonl", 50_000), ("c.jsonl", 50_000), ("d.jsonl", 50_000)]


def test_kill9_midway_then_resume_is_byte_identical(inferd, repo, trained, tmp_path, batch):
    """kill -9 once the manifest lists an object but _SUCCESS is absent; re-run the
    same command: every .out and the manifest's objects equal an uninterrupted run."""
    m = trained["slow"]
    inp = tmp_path / "in"
    for i, (name, n) in enumerate(RESUME_FILES):
        write(inp / name, jsonl_text(m.rows(n, seed=50 + i)))
    extra = ["--records-per-batch", "256"]
    out1, out2 = tmp_path / "out1", tmp_path / "out2"

    batch(repo, "slow", inp, out1, *extra)
    ref = {rel: (out1 / rel).read_bytes() for rel in files_under(out1) if rel.endswith(".out")}
    assert sorted(ref) == sorted(f"{n}.out" for n, _ in RESUME_FILES), sorted(ref)
    ref_objects = manifest(out1)["objects"]
    assert (out1 / "_SUCCESS").exists()

    cmd = [str(inferd), "batch", "--models", str(repo), "--model", "slow",
           "--input", str(inp), "--output", str(out2), *extra]
    log1 = tmp_path / "killed.stderr"
    with open(log1, "wb") as lf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                cwd=str(tmp_path))
    finished_at_kill = None
    try:
        end = time.monotonic() + RUN_DEADLINE_S
        while time.monotonic() < end and proc.poll() is None:
            try:
                objs = json.loads((out2 / "_manifest.json").read_text())["objects"]
            except (OSError, ValueError, KeyError, TypeError):
                objs = {}
            if objs and not (out2 / "_SUCCESS").exists():
                proc.send_signal(signal.SIGKILL)
                finished_at_kill = sorted(objs)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and finished_at_kill is None:
            proc.kill()
        proc.wait()
    if finished_at_kill is None:
        pytest.fail(f"could not catch the run mid-way (exit status {proc.returncode}; "
                    f"_SUCCESS {'present' if (out2 / '_SUCCESS').exists() else 'absent'}): "
                    f"increase RESUME_FILES rows\n{log1.read_text()[-2000:]}")
    assert proc.returncode == -signal.SIGKILL, f"exit status {proc.returncode}"
    assert not (out2 / "_SUCCESS").exists()

    # Atomic writes: whatever .out exists under its final name is complete.
    present = {rel for rel in files_under(out2) if rel.endswith(".out")}
    for rel in present:
        assert (out2 / rel).read_bytes() == ref[rel], \
            f"{rel} exists under its final name after kill -9 but is not the complete output"
    listed = {f"{n}.out" for n in finished_at_kill}
    assert listed <= present, f"manifest lists {sorted(listed)} but only {sorted(present)} exist"
    assert len(present) < len(RESUME_FILES), "every object was already done at the kill"
    stats = {rel: ((out2 / rel).stat().st_mtime_ns, (out2 / rel).stat().st_ino) for rel in listed}
    files_at_kill = files_under(out2)

    res = batch(repo, "slow", inp, out2, *extra)
    for rel, data in ref.items():
        assert (out2 / rel).exists(), f"{rel} missing after the resume"
        assert (out2 / rel).read_bytes() == data, f"{rel} differs from the uninterrupted run"
    assert manifest(out2)["objects"] == ref_objects, "manifest objects differ after the resume"
    assert (out2 / "_SUCCESS").exists()
    for rel, st in stats.items():
        now = (out2 / rel).stat()
        assert (now.st_mtime_ns, now.st_ino) == st, \
            f"{rel} (finished before the kill) was redone on resume\n{res}"
    assert res.summary()[1] == 0, res
    for name in finished_at_kill:
        assert res.line_naming(re.compile("skip", re.I), name), \
            f"the resume's log does not say it skipped {name}\n{res}"
    # No debris: the resumed output folder holds what the uninterrupted one does.
    assert files_under(out2) == files_under(out1), (
        f"after resume: {files_under(out2)}\nuninterrupted: {files_under(out1)}\n"
        f"at kill: {files_at_kill}")
    print(f"killed after {finished_at_kill}; resume stderr:\n{res.stderr[-1500:]}")


# ---------------------------------------------------------------------------
# issue 13: what a file holds stays out of messages; NUL bytes; changed inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt_ext", ["csv", "jsonl"])
def test_errors_quote_nothing_of_the_file(batch, repo, tmp_path, fmt_ext):
    """A batch over a text file that is no data (a copy of /etc/passwd): every bad record's
    line in .errors, and the failure on stderr, name the line and the problem but hold none of
    the file's words."""
    from conftest import assert_quotes_nothing_of, passwd_copy
    src = tmp_path / "in" / f"stolen.{fmt_ext}"
    text = passwd_copy(src)
    n_lines = len(text.splitlines())

    res = batch(repo, "binary", src, tmp_path / "out", "--max-errors", "100000")
    assert res.summary() == (n_lines, n_lines), res
    errs = (tmp_path / "out" / f"stolen.{fmt_ext}.errors").read_text()
    lines = errs.splitlines()
    assert len(lines) == n_lines, errs[:500]
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"line {i}: "), line
        assert_quotes_nothing_of(text, line, f"stolen.{fmt_ext}.errors line {i}")
    assert_quotes_nothing_of(text, res.stderr, "stderr")

    res = batch(repo, "binary", src, tmp_path / "strict", check=False)
    assert res.rc != 0 and res.line_naming(f"stolen.{fmt_ext}", "line 1:"), res
    assert_quotes_nothing_of(text, res.stderr, "stderr of the failed run")


def nul_records(X, bad, fmt_ext):
    """X as CSV or JSON Lines, with a NUL byte inside the records at 1-based lines ``bad``;
    each is followed by five more columns, which a reader that stops at the NUL misses."""
    text = csv_text(X) if fmt_ext == "csv" else jsonl_text(X)
    lines = text.splitlines()
    for ln in bad:
        if fmt_ext == "csv":
            lines[ln - 1] = lines[ln - 1] + "\0" + ",1,2,3,4,5"
        else:
            lines[ln - 1] = lines[ln - 1][:-1] + "\0" + ",1,2,3,4,5]"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("fmt_ext", ["csv", "jsonl"])
def test_nul_byte_makes_a_bad_record(batch, repo, trained, tmp_path, fmt_ext):
    """A NUL byte does not end a record: the record is bad (counted, named by its line in
    .errors); the others still score as python-xgboost does."""
    m = trained["binary"]
    X = m.rows(N_ROWS, seed=60)
    bad = [7, 57]
    src = write(tmp_path / "in" / f"nul.{fmt_ext}", nul_records(X, bad, fmt_ext))
    res = batch(repo, "binary", src, tmp_path / "out", "--max-errors", "5")
    assert res.summary() == (N_ROWS, 2), res
    check_tolerated(tmp_path / "out", f"nul.{fmt_ext}", m, X, [b - 1 for b in bad], bad,
                    mode=fmt_ext)
    for line in (tmp_path / "out" / f"nul.{fmt_ext}.errors").read_text().splitlines():
        assert "NUL byte" in line, line

    res = batch(repo, "binary", src, tmp_path / "strict", check=False)
    assert res.rc != 0, f"a record with a NUL byte was accepted\n{res}"
    assert res.line_naming(f"nul.{fmt_ext}", "line 7:", "NUL"), res


def input_identity(path):
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def out_stat(path):
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_ino


@pytest.mark.parametrize("change", ["same-size-new-mtime", "new-size"])
def test_rerun_redoes_an_object_whose_input_changed(batch, repo, trained, tmp_path, change):
    """The manifest records each input's size and modification time; a re-run redoes an object
    whose input changed (and only it), and writes its new identity."""
    m = trained["binary"]
    inp, out = tmp_path / "in", tmp_path / "out"
    Xa, Xb = m.rows(200, seed=61), m.rows(50, seed=62)
    write(inp / "a.csv", csv_text(Xa))
    write(inp / "b.csv", csv_text(Xb))
    batch(repo, "binary", inp, out)
    objs = manifest(out)["objects"]
    for name in ("a.csv", "b.csv"):
        assert objs[name]["input"] == input_identity(inp / name), objs[name]
    b_before = out_stat(out / "b.csv.out")

    old = (inp / "a.csv").stat()
    if change == "new-size":
        Xa = m.rows(201, seed=63)
        write(inp / "a.csv", csv_text(Xa))
    else:
        # new values, the same number of bytes: each row's first value gets its sign flipped
        # where that keeps the text's length
        lines = (inp / "a.csv").read_text().splitlines()
        flipped = []
        for i, line in enumerate(lines):
            first, rest = line.split(",", 1)
            if first.startswith("-"):
                first = "+" + first[1:]
                Xa[i, 0] = -Xa[i, 0]
            flipped.append(first + "," + rest)
        write(inp / "a.csv", "\n".join(flipped) + "\n")
        assert (inp / "a.csv").stat().st_size == old.st_size
        os.utime(inp / "a.csv", ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    res = batch(repo, "binary", inp, out)
    assert "objects=1 skipped=1" in res.stderr, f"expected a.csv redone, b.csv skipped\n{res}"
    check_predictions(out / "a.csv.out", m, Xa, "csv")
    assert out_stat(out / "b.csv.out") == b_before, "an unchanged input's .out was rewritten"
    objs = manifest(out)["objects"]
    assert objs["a.csv"]["input"] == input_identity(inp / "a.csv"), objs["a.csv"]
    check_manifest(out, {"a.csv": len(Xa), "b.csv": 50})


def test_rerun_with_a_manifest_without_input_identity_redoes_it(batch, repo, trained,
                                                                  tmp_path):
    """A manifest written before inputs were recorded cannot tell a changed input from an
    unchanged one: its objects run again (once), and the manifest then records them."""
    m = trained["binary"]
    inp, out = tmp_path / "in", tmp_path / "out"
    X = m.rows(30, seed=64)
    write(inp / "a.jsonl", jsonl_text(X))
    batch(repo, "binary", inp, out)
    old = manifest(out)
    for entry in old["objects"].values():
        del entry["input"]
    (out / "_manifest.json").write_text(json.dumps(old))
    before = out_stat(out / "a.jsonl.out")

    res = batch(repo, "binary", inp, out)
    assert "objects=1 skipped=0" in res.stderr, res
    assert out_stat(out / "a.jsonl.out") != before, "the object was not run again"
    assert manifest(out)["objects"]["a.jsonl"]["input"] == input_identity(inp / "a.jsonl")
    res = batch(repo, "binary", inp, out)
    assert "objects=0 skipped=1" in res.stderr, f"a second re-run did not skip\n{res}"


def test_redone_object_drops_its_stale_errors(batch, repo, trained, tmp_path):
    """A changed input whose bad records are gone leaves no .errors from the earlier run."""
    m = trained["binary"]
    inp, out = tmp_path / "in", tmp_path / "out"
    X = m.rows(N_ROWS, seed=65)
    write(inp / "a.jsonl", bad_jsonl(X, [5], "string"))
    batch(repo, "binary", inp, out, "--max-errors", "5")
    assert (out / "a.jsonl.errors").exists()
    write(inp / "a.jsonl", jsonl_text(X))
    batch(repo, "binary", inp, out, "--max-errors", "5")
    assert not (out / "a.jsonl.errors").exists(), "a stale .errors outlived its input"
    check_predictions(out / "a.jsonl.out", m, X, "jsonl")


def test_jsonl_nan_record_says_send_null(batch, repo, trained, tmp_path):
    """A record written by Python's json.dumps with a NaN names its line and what to send."""
    m = trained["binary"]
    X = m.rows(5, seed=41)
    lines = [json.dumps([float(v) for v in r]) for r in X]
    lines[2] = json.dumps([float("nan")] + [float(v) for v in X[2][1:]])
    src = write(tmp_path / "in" / "nan.jsonl", "\n".join(lines) + "\n")
    res = batch(repo, "binary", src, tmp_path / "out", check=False)
    assert res.rc != 0, f"a NaN record was accepted\n{res}"
    assert res.line_naming("nan.jsonl", "line 3", "JSON has no NaN: send null for a missing value"), \
        f"no stderr line names nan.jsonl, line 3 and the NaN hint\n{res}"
