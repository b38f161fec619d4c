"""Waiting for a server: until it answers, or its process exits, or time runs out."""

import http.server
import threading

import pytest
from helpers import free_port

from pipeline.services import ServiceError, wait_for_http


class Proc:
    """What wait_for_http reads of a server's process: ``poll()`` and ``returncode``."""

    def __init__(self, returncode=None):
        self.returncode = returncode

    def poll(self):
        return self.returncode


@pytest.fixture()
def server():
    """A local HTTP server: ``/ok`` answers 200, ``/private`` 401."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ok" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join()


def test_returns_once_the_url_answers(server):
    wait_for_http(f"{server}/ok", Proc(), 30)
    wait_for_http(f"{server}/private", Proc(), 30, ok=(200, 401))  # up, asking for a login


def test_a_server_that_exited_is_an_error_at_once():
    with pytest.raises(ServiceError, match="mlflow server exited .3."):
        wait_for_http(f"http://127.0.0.1:{free_port()}/health", Proc(3), 600,
                      what="mlflow server")


def test_no_answer_in_time_is_an_error_naming_the_url(server):
    with pytest.raises(ServiceError, match=f"did not answer {server}/private within 0 s"):
        wait_for_http(f"{server}/private", Proc(), 0)  # 401 is not "up" unless allowed
