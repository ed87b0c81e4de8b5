"""GET /metrics: Prometheus text that reflects the requests made."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import assert_close, infer_body, wait_for

HISTOGRAMS = ["inferd_request_duration_seconds", "inferd_batcher_queue_seconds", "inferd_batch_size"]


def parse(text):
    """{family name: family}, every family parsed (a parse error fails the test)."""
    fams = {}
    for fam in text_string_to_metric_families(text):
        fams[fam.name] = fam
    return fams


def value(fams, sample_name, **labels):
    """Sum of the samples named ``sample_name`` whose labels include ``labels``."""
    total = 0.0
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture
def server(server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    trained["regression"].install(repo_dir)
    return server_factory(repo_dir)


def scrape(client):
    r = client.get("/metrics")
    assert r.status_code == 200, r.status_code
    assert r.headers.get("Content-Type", "").startswith("text/plain"), r.headers.get("Content-Type")
    return parse(r.text)


def test_metrics_parse_and_have_the_families(server, trained):
    c = server.client()
    X = trained["binary"].rows(2, seed=1)
    c.predict("binary", X)
    fams = scrape(c)
    requests_fam = fams.get("inferd_requests") or fams.get("inferd_requests_total")
    assert requests_fam is not None, f"no inferd_requests_total; families: {sorted(fams)}"
    assert requests_fam.type == "counter", requests_fam.type
    for name in HISTOGRAMS:
        assert name in fams, f"missing {name}; families: {sorted(fams)}"
        assert fams[name].type == "histogram", (name, fams[name].type)
        suffixes = {s.name[len(name):] for s in fams[name].samples if s.labels.get("model") == "binary"}
        assert {"_bucket", "_count", "_sum"} <= suffixes, (name, suffixes)
        inf = [s for s in fams[name].samples
               if s.name == name + "_bucket" and s.labels.get("le") == "+Inf" and s.labels.get("model") == "binary"]
        assert len(inf) == 1, f"{name}: one +Inf bucket for model=binary expected, got {inf}"
    assert "inferd_inflight_requests" in fams, sorted(fams)
    assert fams["inferd_inflight_requests"].type == "gauge"


def test_request_counters_and_histograms_reflect_requests(server, trained):
    c = server.client()
    m = trained["binary"]
    before = scrape(c)
    n_ok, n_bad = 5, 2
    for i in range(n_ok):
        X = m.rows(1, seed=10 + i)
        assert_close(c.predict("binary", X), m.expected(X), "binary")
    for _ in range(n_bad):
        r = c.post("/v2/models/binary/infer", json=infer_body(m.rows(1, seed=0)[:, :3]))
        assert r.status_code == 422, r.text[:200]
    Y = trained["regression"].rows(4, seed=20)
    c.predict("regression", Y)
    after = scrape(c)

    def delta(sample, **labels):
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert delta("inferd_requests_total", model="binary", status="200") == n_ok, \
        "inferd_requests_total{model=binary,status=200} should grow by the 5 successful requests"
    assert delta("inferd_requests_total", model="binary", status="422") == n_bad, \
        "inferd_requests_total{model=binary,status=422} should grow by the 2 rejected requests"
    assert delta("inferd_requests_total", model="regression", status="200") == 1
    # Every successful request is timed; each was a 1-row batch of its own.
    assert delta("inferd_request_duration_seconds_count", model="binary") >= n_ok
    assert delta("inferd_request_duration_seconds_sum", model="binary") > 0
    assert delta("inferd_batcher_queue_seconds_count", model="binary") == n_ok
    assert delta("inferd_batch_size_count", model="binary") == n_ok, \
        "5 sequential 1-row requests are 5 batches"
    assert delta("inferd_batch_size_sum", model="binary") == n_ok, "5 batches of 1 row"
    assert delta("inferd_batch_size_sum", model="regression") == 4, "one batch of 4 rows"
    # Buckets are cumulative: +Inf bucket == count.
    for h in HISTOGRAMS:
        inf = value(after, h + "_bucket", model="binary", le="+Inf")
        assert inf == value(after, h + "_count", model="binary"), h
    # Nothing in flight once all answers are in.
    wait_for(lambda: value(scrape(c), "inferd_inflight_requests", model="binary") == 0, 10,
             "inferd_inflight_requests{model=binary} to return to 0")


def test_metrics_count_404_and_errors_dont_break_scrape(server, trained):
    c = server.client()
    r = c.post("/v2/models/nope/infer", json=infer_body(trained["binary"].rows(1, seed=0)))
    assert r.status_code == 404
    r = c.post("/v2/models/binary/infer", data=b"{bad json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    fams = scrape(c)
    assert value(fams, "inferd_requests_total", model="binary", status="400") >= 1, \
        "a 400 on model binary should be counted with status=400"
