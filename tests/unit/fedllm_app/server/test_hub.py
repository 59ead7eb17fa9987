"""hub.push: bad settings fail at start; the upload goes through huggingface_hub to a local stand-in Hub.

The stand-in answers the four calls ``create_repo`` + ``upload_folder`` make for small files (repo creation,
README YAML validation, pre-upload, commit) the way the documented Hub API does, so the test runs fedllm's push
and the real client offline. What it cannot show: the real Hub's answers, LFS/Xet uploads of large files, auth.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.hub import check_hub, push_adapter


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["hub.push=true"], r"hub.push=true needs hub.repo_id; set hub.repo_id=<user or org>/<name> or hub.push=false"),
        (["hub.push=true", "hub.repo_id=a/b/c"], r"hub.repo_id='a/b/c' is not a Hub repository id"),
        (["hub.push=true", "hub.repo_id=a/b", "strategy=local"], r"strategy=local: each client keeps its own"),
    ],
)
def test_bad_hub_settings_fail_config_validation_with_the_fix(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({}, overrides)


def test_push_without_a_token_fails_at_the_start_of_the_run(tmp_path, monkeypatch):
    import huggingface_hub.constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cfg = load_config({}, ["hub.push=true", "hub.repo_id=alice/tiny"])
    with pytest.raises(ConfigError, match=r"no Hugging Face token was found; run `hf auth login` or set HF_TOKEN"):
        check_hub(cfg)
    check_hub(load_config({}))  # push off: nothing to check


class _StandInHub(BaseHTTPRequestHandler):
    """Records what the client sends; answers like the Hub for a small-file commit."""

    received: dict = {}

    def log_message(self, *_):
        pass

    def _json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(404, {"error": "not served by the stand-in"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            self.received["create"] = json.loads(body)
            self.received["auth"] = self.headers.get("Authorization")
            request = self.received["create"]
            return self._json(200, {"url": f"{host}/{request['organization']}/{request['name']}"})
        if self.path == "/api/validate-yaml":
            return self._json(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._json(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.received["files"] = {
                x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"
            }
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            return self._json(200, {"commitUrl": f"{host}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._json(404, {"error": self.path})


@pytest.fixture
def stand_in_hub(monkeypatch):
    _StandInHub.received = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    try:
        yield _StandInHub.received
    finally:
        server.shutdown()


def test_push_creates_the_private_repo_and_uploads_adapter_and_card(tmp_path, stand_in_hub):
    folder = tmp_path / "run" / "checkpoints" / "round-2"
    folder.mkdir(parents=True)
    files = {"adapter_model.safetensors": bytes(range(256)) * 100, "adapter_config.json": b"{}", "README.md": b"# c"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    cfg = load_config({}, ["hub.push=true", "hub.repo_id=alice/fedllm-tiny"])
    url = push_adapter(folder, cfg.hub)
    assert url.endswith("/alice/fedllm-tiny/commit/" + "a" * 40)
    assert stand_in_hub["create"] == {"name": "fedllm-tiny", "organization": "alice", "visibility": "private"}
    assert stand_in_hub["auth"] == "Bearer hf_test_token"
    assert stand_in_hub["files"] == files


def test_a_failed_push_says_where_the_adapter_is_and_how_to_upload_it_later(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    cfg = load_config({}, ["hub.push=true", "hub.repo_id=alice/fedllm-tiny"])
    with pytest.raises(RuntimeError, match=rf"upload them later with `hf upload alice/fedllm-tiny {tmp_path}`"):
        push_adapter(tmp_path, cfg.hub)
