"""``serve --http``: Prometheus metrics that agree with ``server_status.json``, a live page a real browser renders,
``python -m splittrain status``, and a monitor that says nothing without its token."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from processes import Processes, make_tokens, read_status, summary, wait_for, write_config
from splittrain.cli import main
from splittrain.errors import UserError
from splittrain.server.monitor import Monitor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser: (sample name, labels) -> value."""
    status, body = get(url + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def page_rows(url: str) -> dict[str, int]:
    """The page as a headless Chromium renders it (its script has polled /status): client -> step in its row."""
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                          "--dump-dom", url + "/"], capture_output=True, text=True, timeout=60).stdout
    return {name: int(step) for name, step in
            re.findall(r'<tr id="client-([^"]+)"><td class="name">[^<]*</td><td class="step">(\d+)</td>', dom)}


@pytest.mark.slow
def test_metrics_page_and_status_command_while_a_client_trains(tmp_path, capsys):
    tokens, known = make_tokens(tmp_path, "client0")
    config = write_config(tmp_path / "config.yaml", tmp_path / "client", steps=60, every=60)
    processes = Processes(tmp_path)
    try:
        server, address = processes.serve(config, tokens, tmp_path / "server", "--http", "127.0.0.1:0",
                                          "--threads", "1")
        url = "http://" + re.search(r"monitor on http://(\S+)/ ", server.log.read_text()).group(1)
        client = processes.fit(config, "--model.transport", "tcp", "--model.address", address,
                               "--trainer.limit_val_batches", "0", token=known["client0"])
        steps = ("splittrain_steps_applied_total", ())
        first = wait_for(lambda: (m := scrape(url)) and m[steps] >= 3 and m, 120, "3 steps", client, client.log)
        rows = []
        if CHROMIUM is not None:  # the page, as a browser renders it, twice while the client trains
            rows.append(page_rows(url))
            wait_for(lambda: scrape(url)[steps] >= max(rows[0].values(), default=0) + 3, 60, "3 more steps", client)
            rows.append(page_rows(url))
        Processes.finish(client, timeout=300)
        # While training the counters only grew ...
        last = wait_for(lambda: (s := read_status(tmp_path / "server")) and not s["sessions"] and s, 20,
                        "the session to end")
        metrics = scrape(url)
        assert first[steps] < metrics[steps] == 60
        # ... and once it is done they agree with server_status.json, which the same server wrote.
        client0 = (("client", "client0"),)
        assert metrics[steps] == last["counters"]["steps_applied"]
        assert metrics[("splittrain_bytes_in_total", client0)] == last["clients"]["client0"]["bytes_in"] > 0
        assert metrics[("splittrain_bytes_out_total", client0)] == last["clients"]["client0"]["bytes_out"] > 0
        assert metrics[("splittrain_requests_total", (("client", "client0"), ("kind", "forward")))] == \
            last["counters"]["forward"]
        assert metrics[("splittrain_adapter_step", (("owner", "client0"),))] == 60
        # The client's own count of bytes is the server's, seen from the other side.
        assert summary(tmp_path / "client")["wire_bytes"] >= metrics[("splittrain_bytes_in_total", client0)] + \
            metrics[("splittrain_bytes_out_total", client0)]
        if CHROMIUM is not None:
            print(f"the page's step of client0: {rows[0]} then {rows[1]}")
            assert 0 < rows[0]["client0"] < rows[1]["client0"]
        # The terminal's view: from the monitor, and from the run folder.
        for where in (["--address", url.removeprefix("http://")], ["--run_dir", str(tmp_path / "server")]):
            main(["status", *where])
            out = capsys.readouterr().out
            assert "60 steps applied" in out and re.search(r"client0\s+60\s", out), out
        assert known["client0"] not in get(url + "/status")[1].decode() + server.log.read_text()
    finally:
        processes.close()
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (.ci/run installs it): the page was not rendered")


def test_a_monitor_without_its_token_says_nothing():
    status = {"counters": {"steps_applied": 7}, "busy_seconds": 1.0, "rss_bytes": 1, "sessions": {},
              "clients": {"alice": {"requests": {"forward": 1}, "bytes_in": 5, "bytes_out": 6, "tokens": 9,
                                    "last_seen": 1.0}}, "adapters": {"alice": {"step": 7}}}
    monitor = Monitor(lambda: status, "127.0.0.1:0", token="s3cret-token")
    monitor.start()
    url = f"http://{monitor.address}"
    try:
        for path in ("/metrics", "/status"):
            for token in (None, "wrong", "s3cret-token-but-longer"):
                code, body = get(url + path, token)
                assert code == 401 and body == b"unauthorized\n", (path, token)
            assert get(url + path, "s3cret-token")[0] == 200
        code, page = get(url + "/")
        assert code == 200 and b"alice" not in page and b"s3cret" not in page  # the page holds no data
        assert get(url + "/elsewhere")[0] == 404
        assert b"s3cret" not in get(url + "/status", "s3cret-token")[1]
    finally:
        monitor.stop()


def test_a_monitor_off_loopback_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="beyond loopback"):
        Monitor(lambda: {}, "0.0.0.0:0")
    tokens, _ = make_tokens(tmp_path, "client0")
    serve = ["serve", "--config", str(write_config(tmp_path / "c.yaml", tmp_path / "run")), "--tokens", str(tokens),
             "--address", "127.0.0.1:0"]
    with pytest.raises(UserError, match="beyond loopback: .* give --http_token_file"):
        main([*serve, "--http", "0.0.0.0:0"])
    with pytest.raises(UserError, match="give --http HOST:PORT too"):
        main([*serve, "--http_token_file", str(tokens)])
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        main([*serve, "--http", "0.0.0.0:0", "--http_token_file", str(empty)])
    with pytest.raises(UserError, match="either --address"):
        main(["status"])
