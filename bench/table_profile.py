#!/usr/bin/python3
"""Where one `inferd batch` run from a PostgreSQL table spent its time, from the server's log.

    /usr/bin/python3 bench/table_profile.py --log POSTGRES_LOG --app APPLICATION_NAME

bench/table_run's cluster logs every statement with its duration (log_min_duration_statement
= 0) and every executor plan with its own (auto_explain.log_min_duration = 0), under
log_line_prefix '%m [%p] %a: ', and runs each inferd with its own PGAPPNAME. From that run's
entries:

  open_s      first statement of the run to the start of the source's COPY ... TO STDOUT
              (connecting, checking the source and the sink, creating the staging table)
  read_s      the source's COPY (SELECT ... ORDER BY keys) TO STDOUT, start to end: rows are
              read while earlier chunks are scored and written, so this is read + score
  staging_s   the sum of the sink's COPY ... __inferd_staging FROM STDIN (staging_n chunks),
              on the sink's connection, overlapping read_s
  drain_s     end of the source's COPY to the start of the merge (the last chunks)
  merge_s     the merge transaction (BEGIN; a new target created, filled and given its unique
              constraint, or an INSERT ... ON CONFLICT into an existing one; the errors table;
              the run's row; DROP staging; COMMIT), of which
  upsert_s    its INSERT into the target alone (auto_explain)

Prints one line: PROFILE open_s=... read_s=... staging_s=... staging_n=... drain_s=...
merge_s=... upsert_s=... (a phase the log does not show is "nan"); exits 1 if the run has
no entries.
"""
import argparse
import datetime
import math
import re
import sys

ENTRY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \S+ \[(\d+)\] (.*?): "
                   r"(?:LOG|ERROR|WARNING|DETAIL|STATEMENT|FATAL|HINT|CONTEXT|NOTICE):  ")
DURATION = re.compile(r"duration: ([0-9.]+) ms  (statement|plan):\s*(.*)", re.S)


def entries(path, app):
    """(end time in s, body) of each log entry of `app`, continuation lines included"""
    cur = None
    with open(path, errors="replace") as f:
        for line in f:
            m = ENTRY.match(line)
            if m:
                if cur:
                    yield cur
                cur = None
                if m.group(3) == app:
                    t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
                    cur = [t.timestamp(), line[m.end():]]
            elif cur:
                cur[1] += line
    if cur:
        yield cur


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", required=True)
    ap.add_argument("--app", required=True)
    a = ap.parse_args()

    first = None
    copy_out = merge = None  # (start, end)
    staging_s, staging_n, upsert_s = 0.0, 0, math.nan
    for t, body in entries(a.log, a.app):
        first = t if first is None else min(first, t)
        m = DURATION.match(body)
        if not m:
            continue
        d = float(m.group(1)) / 1000.0
        kind, text = m.group(2), m.group(3)
        if kind == "statement":
            if text.startswith("COPY (SELECT") and "TO STDOUT" in text:
                copy_out = (t - d, t)
            elif text.startswith("COPY ") and "__inferd_staging" in text and "FROM STDIN" in text:
                staging_s += d
                staging_n += 1
            elif text.startswith("BEGIN;") and "__inferd_staging" in text and \
                    "DROP TABLE" in text:
                merge = (t - d, t)
        elif re.search(r"^\s*Insert on (?!\S*(_errors|__inferd_staging|inferd_batch_runs)\b)\S+",
                       text, re.M):
            upsert_s = d
    if first is None:
        sys.exit(f"table_profile: no entries of application '{a.app}' in {a.log}")
    nan = math.nan
    open_s = copy_out[0] - first if copy_out else nan
    read_s = copy_out[1] - copy_out[0] if copy_out else nan
    drain_s = merge[0] - copy_out[1] if copy_out and merge else nan
    merge_s = merge[1] - merge[0] if merge else nan
    print(f"PROFILE open_s={open_s:.3f} read_s={read_s:.3f} staging_s={staging_s:.3f} "
          f"staging_n={staging_n} drain_s={drain_s:.3f} merge_s={merge_s:.3f} "
          f"upsert_s={upsert_s:.3f}", flush=True)


if __name__ == "__main__":
    main()
