"""The `http` reward and `raft-diffusion serve-reward`: real servers on 127.0.0.1, free ports only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from raft_diffusion.errors import UserError
from raft_diffusion.rewards import build_reward, check_reads
from raft_diffusion.rewards.compose import _safe_scores
from raft_diffusion.rewards.http import HttpRewardError, make_server

from .conftest import REPO, TINY_CONFIG, deep_update, metrics_without_seconds, one_error_line, run_in_process, write_yaml

CPU = torch.device("cpu")


class Served:
    """A server in a thread of this process; `posts` counts POST /score requests."""

    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/score"
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def counting(server):
    """Wrap a server's handler so that server.posts counts the POSTs it received."""
    server.posts = 0
    handler = server.RequestHandlerClass
    lock = threading.Lock()

    class Counting(handler):
        def do_POST(self):  # noqa: N802
            with lock:
                server.posts += 1
            super().do_POST()

    server.RequestHandlerClass = Counting
    return server


def jpeg_server(port: int = 0):
    fn = build_reward("jpeg_compressibility", {}, CPU)
    return Served(counting(make_server(fn, "jpeg_compressibility", "images", "127.0.0.1", port)))


def custom_server(reply):
    """A server whose POST reply is `reply(request_json) -> (status, body bytes)`, after its own delays."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.server.posts += 1
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, body = reply(request)
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.posts = 0
    return Served(server)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    smooth = torch.rand(5, 3, 1, 1, generator=g).expand(5, 3, 32, 32)
    noisy = torch.rand(5, 3, 32, 32, generator=g)
    return torch.cat([smooth, noisy])


def test_scores_over_http_equal_the_in_process_reward(images):
    served = jpeg_server()
    try:
        remote = build_reward("http", {"url": served.url}, CPU)
        local = build_reward("jpeg_compressibility", {}, CPU)
        prompts = [f"p{i}" for i in range(len(images))]
        assert remote(images, prompts) == local(images, prompts)
    finally:
        served.stop()


def test_a_batch_of_n_is_posted_in_ceil_n_over_batch_size_requests(images):
    served = jpeg_server()
    try:
        remote = build_reward("http", {"url": served.url, "batch_size": 4}, CPU)
        scores = remote(images, ["p"] * 10)
        assert len(scores) == 10 and served.server.posts == math.ceil(10 / 4)
    finally:
        served.stop()


def test_texts_are_posted_as_texts():
    seen = []

    def reply(request):
        seen.append(request)
        return 200, json.dumps({"scores": [float(len(t)) for t in request["texts"]]}).encode()

    served = custom_server(reply)
    try:
        remote = build_reward("http", {"url": served.url, "reads": "texts"}, CPU)
        assert remote(["ab", "abcd"], ["p", "q"]) == [2.0, 4.0]
        assert seen == [{"prompts": ["p", "q"], "texts": ["ab", "abcd"]}]
    finally:
        served.stop()


def test_a_slow_server_times_out_retries_and_fails_without_hanging(images):
    stop = threading.Event()

    def reply(request):
        stop.wait(10)  # longer than the client waits
        return 200, b'{"scores": []}'

    served = custom_server(reply)
    try:
        remote = build_reward("http", {"url": served.url, "timeout": 0.3, "retries": 1}, CPU)
        start = time.monotonic()
        with pytest.raises(HttpRewardError, match="timeout of 0.3 s.*2 attempts"):
            remote(images[:2], ["p", "q"])
        assert time.monotonic() - start < 4
        assert served.server.posts == 2
        # compose then scores sample by sample: they fail at once (the server just failed), all dropped
        errors: list[str] = []
        start = time.monotonic()
        scores = _safe_scores(remote, images[:4], ["p"] * 4, errors)
        assert np.isnan(scores).all() and "HttpRewardError" in errors[0]
        assert time.monotonic() - start < 8
    finally:
        stop.set()
        served.stop()


def test_a_5xx_is_retried_and_then_succeeds(images):
    calls = []

    def reply(request):
        calls.append(1)
        if len(calls) == 1:
            return 503, b'{"error": "busy"}'
        return 200, json.dumps({"scores": [1.0] * len(request["prompts"])}).encode()

    served = custom_server(reply)
    try:
        remote = build_reward("http", {"url": served.url, "retries": 2}, CPU)
        assert remote(images[:3], ["p"] * 3) == [1.0, 1.0, 1.0] and len(calls) == 2
    finally:
        served.stop()


@pytest.mark.parametrize("body, message", [
    (b'{"scores": [1.0]}', "the reply has 1 scores for 3 samples"),
    (b"<html>oops</html>", "the reply is not JSON: '<html>oops</html>'"),
    (b'{"score": [1, 2, 3]}', 'the reply has no "scores" list'),
])
def test_a_reply_of_the_wrong_length_or_not_json_is_one_clear_error(images, body, message):
    served = custom_server(lambda request: (200, body))
    try:
        remote = build_reward("http", {"url": served.url, "retries": 3}, CPU)
        with pytest.raises(HttpRewardError) as caught:
            remote(images[:3], ["p"] * 3)
        assert str(caught.value) == message and served.server.posts == 1  # not retried
    finally:
        served.stop()


def test_null_and_nan_scores_are_dropped_samples(images):
    served = custom_server(lambda request: (200, b'{"scores": [1.5, null, NaN]}'))
    try:
        remote = build_reward("http", {"url": served.url}, CPU)
        errors: list[str] = []
        scores = _safe_scores(remote, images[:3], ["p"] * 3, errors)
        assert scores[0] == 1.5 and np.isnan(scores[1:]).all() and errors == ["returned a non-finite score"]
    finally:
        served.stop()


def test_an_unreachable_server_fails_fast(images):
    served = jpeg_server()
    url = served.url
    served.stop()  # nothing listens there now
    remote = build_reward("http", {"url": url, "retries": 1}, CPU)
    start = time.monotonic()
    with pytest.raises(HttpRewardError, match="cannot connect"):
        remote(images[:2], ["p", "q"])
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("options, field", [
    ({}, "rewards.0.options.url"),
    ({"url": "ftp://x/score"}, "rewards.0.options.url"),
    ({"url": "http://x", "timeout": 0}, "rewards.0.options.timeout"),
    ({"url": "http://x", "timeout": "soon"}, "rewards.0.options.timeout"),
    ({"url": "http://x", "batch_size": 0}, "rewards.0.options.batch_size"),
    ({"url": "http://x", "retries": -1}, "rewards.0.options.retries"),
    ({"url": "http://x", "reads": "audio"}, "rewards.0.options.reads"),
    ({"url": "http://x", "verbose": True}, "rewards.0.options"),
])
def test_bad_options_name_their_field(options, field):
    with pytest.raises(UserError) as caught:
        build_reward("http", options, CPU, field="rewards.0")
    assert caught.value.field == field


def test_reads_follows_the_option():
    check_reads("http", "images", "config rewards.0.name", {"url": "http://x"})
    check_reads("http", "texts", "config rewards.0.name", {"url": "http://x", "reads": "texts"})
    with pytest.raises(UserError) as caught:
        check_reads("http", "texts", "config rewards.0.name", {"url": "http://x"})
    assert caught.value.field == "config rewards.0.options.reads"
    with pytest.raises(UserError) as caught:
        check_reads("http", "images", "config rewards.0.name", {"reads": "pictures"})
    assert caught.value.field == "config rewards.0.options.reads"


def test_a_run_with_bad_http_options_is_exit_2_one_line(tmp_path, capfd):
    config = write_yaml(tmp_path / "run.yaml", deep_update(TINY_CONFIG, {
        "output_dir": str(tmp_path / "run"), "rewards": [{"name": "http", "options": {"url": "localhost:8000"}}]}))
    result = run_in_process(capfd, "train", str(config))
    assert result.returncode == 2
    assert "rewards.0.options.url" in one_error_line(result.stderr)


@pytest.mark.parametrize("args, field", [
    (["nope"], "REWARD"),
    (["http"], "REWARD"),
    (["jpeg_compressibility", "--options", "{quality: 80"], "--options"),
    (["jpeg_compressibility", "--options", "[1]"], "--options"),
    (["jpeg_compressibility", "--options", '{"quality": 900}'], "--options.quality"),
    (["jpeg_compressibility", "--options", '{"colour": 1}'], "--options"),
    (["jpeg_compressibility", "--port", "70000"], "--port"),
])
def test_serve_reward_refuses_bad_arguments_exit_2_one_line(capfd, args, field):
    result = run_in_process(capfd, "serve-reward", *args)
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(f"error: {field}: ")


def _run_config(tmp_path, name: str, rewards: list) -> tuple:
    run = tmp_path / name
    config = write_yaml(tmp_path / f"{name}.yaml", deep_update(TINY_CONFIG, {"output_dir": str(run),
                                                                          "rewards": rewards}))
    return config, run


def test_serve_reward_serves_a_tiny_run_with_the_in_process_numbers(tmp_path, capfd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "raft_diffusion", "serve-reward", "jpeg_compressibility",
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()  # the process's imports: bounded by the test's own timeout below
        assert line.startswith("serving jpeg_compressibility on http://127.0.0.1:"), (line, server.poll())
        url = line.split(" on ")[1].strip()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert json.loads(r.read()) == {"reward": "jpeg_compressibility", "reads": "images"}
        local, local_run = _run_config(tmp_path, "local", [{"name": "jpeg_compressibility"}])
        remote, remote_run = _run_config(tmp_path, "remote", [{"name": "http", "label": "jpeg_compressibility",
                                                               "options": {"url": url, "timeout": 30}}])
        assert run_in_process(capfd, "train", str(local)).returncode == 0
        result = run_in_process(capfd, "train", str(remote))
        assert result.returncode == 0, result.stderr
        a, b = metrics_without_seconds(local_run), metrics_without_seconds(remote_run)
        assert len(a) == len(b) > 0
        assert a == b  # reward_mean, reward_std, rewards, eval, train_loss...: all but the timings
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err  # SIGTERM ends it cleanly
    assert "stopped serving jpeg_compressibility" in out


def test_a_server_killed_mid_run_stops_it_in_one_line_and_resume_continues(tmp_path, capfd):
    served = jpeg_server()
    port, posts_before_death = served.port, 3
    server = served.server
    handler = server.RequestHandlerClass

    class Dying(handler):
        def do_POST(self):  # noqa: N802
            if server.posts >= posts_before_death:  # the server is "killed": it stops listening
                threading.Thread(target=served.stop, daemon=True).start()
                self.close_connection = True
                return
            super().do_POST()

    server.RequestHandlerClass = Dying
    config, run = _run_config(tmp_path, "run", [{"name": "http", "options": {"url": served.url, "timeout": 10,
                                                                             "retries": 1}}])
    result = run_in_process(capfd, "train", str(config))
    served.thread.join(10)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert line.startswith("error: iteration 2: the rewards failed on every sample") and "HttpRewardError" in line, line
    done = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    restarted = jpeg_server(port)  # the same address again
    try:
        result = run_in_process(capfd, "train", str(config), "--resume")
        assert result.returncode == 0, result.stderr
    finally:
        restarted.stop()
    records = metrics_without_seconds(run)
    assert len(done) == 1 and len(records) == 2  # iteration 1 kept, iteration 2 run again on --resume


def test_score_refuses_an_http_reward_that_reads_texts(tmp_path, capfd):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = run_in_process(capfd, "score", "--reward", "http", "--option", "url=http://127.0.0.1:9/score",
                            "--option", "reads=texts", str(tmp_path / "a.png"))
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith("error: --option.reads: http reads texts")


def test_the_served_handler_scores_texts_and_refuses_bad_requests():
    import urllib.error
    import urllib.request

    served = Served(make_server(lambda texts, prompts: [[float(len(t))] for t in texts], "lengths", "texts"))
    try:
        remote = build_reward("http", {"url": served.url, "reads": "texts"}, CPU)
        assert remote(["ab", "abcd", ""], ["p", "q", "r"]) == [2.0, 4.0, 0.0]  # (n, 1) scores served flat
        bad = urllib.request.Request(served.url, data=b'{"prompts": ["p"], "images": ["x"]}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(bad, timeout=10)
        assert caught.value.code == 400 and "texts" in json.loads(caught.value.read())["error"]
        with pytest.raises(HttpRewardError, match="HTTP 400"):  # a 4xx is not retried
            build_reward("http", {"url": served.url}, CPU)(torch.zeros(1, 3, 4, 4), ["p"])
    finally:
        served.stop()
