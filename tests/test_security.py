"""Security defaults: localhost binding, constant-time API keys, no pickle anywhere, no files from requests.

Source checks walk the package's syntax trees (not text greps), so comments and strings cannot hide
or fake a call. The behaviour checks run the app in-process on the tiny checkpoint.
"""

from __future__ import annotations

import ast
import inspect
import io
from pathlib import Path

import pytest
from PIL import Image

import openbagel
from openbagel import cli
from openbagel.serve import server

PACKAGE = Path(openbagel.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
SERVE_MODULES = [PACKAGE / "serve" / "server.py", PACKAGE / "serve" / "protocol.py"]


def calls(path: Path):
    """(dotted name, ast.Call) of every call in a source file, e.g. ('torch.load', node)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else kw.value
    return None


# ----- binding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "app"])
def test_commands_bind_localhost_by_default(command):
    args = cli.build_parser().parse_args([command])
    assert args.host == "127.0.0.1"


def test_serve_function_binds_localhost_by_default():
    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"


# ----- API key ---------------------------------------------------------------------------------------


def test_api_key_is_compared_in_constant_time():
    source = Path(server.__file__)
    names = [name for name, _ in calls(source)]
    assert "hmac.compare_digest" in names
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # never `token == api_key` (a timing leak)
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            operands = [ast.unparse(x) for x in (node.left, *node.comparators)]
            assert not any("api_key" in o or "token" in o for o in operands), ast.unparse(node)


@pytest.fixture(scope="module")
def keyed_api(tiny_pipeline, tmp_path_factory):
    from fastapi.testclient import TestClient

    app = server.create_app(tiny_pipeline, api_key="s3cret", sessions_db=tmp_path_factory.mktemp("db") / "s.sqlite3")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("header, status", [
    (None, 401), ("Bearer s3cre", 401), ("Bearer s3cret!", 401), ("Basic s3cret", 401), ("Bearer ", 401),
    ("Bearer s\u00e9cret", 401), ("Bearer s3cret", 200), ("bearer s3cret", 200),
])
def test_api_key_check(keyed_api, header, status):
    headers = {"Authorization": header.encode("utf-8")} if header else {}  # raw bytes: non-ASCII keys too
    response = keyed_api.get("/v1/models", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"


# ----- no pickle -------------------------------------------------------------------------------------

PICKLE_LOADERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load", "dill.loads",
                  "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads",
                  "shelve.open"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_pickle_loading(path):
    for name, node in calls(path):
        where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
        assert name not in PICKLE_LOADERS, f"{where}: {name} can run arbitrary code"
        if name.endswith("torch.load"):
            assert keyword(node, "weights_only") is True, f"{where}: torch.load needs weights_only=True"
        if name in ("np.load", "numpy.load"):
            assert keyword(node, "allow_pickle") in (None, False), f"{where}: np.load(allow_pickle=True)"


def test_pickle_check_would_catch_a_call(tmp_path):
    """Guard for the test above: it does see the calls it forbids."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch\npickle.load(f)\ntorch.load('x.pt')\ntorch.load('y', weights_only=True)\n")
    found = [(name, keyword(node, "weights_only")) for name, node in calls(bad)]
    assert ("pickle.load", None) in found and ("torch.load", None) in found and ("torch.load", True) in found


# ----- files and requests ----------------------------------------------------------------------------

FILE_IO = {"open", "io.open", "os.open", "Path", "shutil.copy", "shutil.copyfile", "os.remove", "os.unlink"}
PATH_IO = {"read_bytes", "read_text", "write_bytes", "write_text", "unlink", "mkdir", "rmdir", "symlink_to"}


@pytest.mark.parametrize("path", SERVE_MODULES, ids=lambda p: p.name)
def test_request_handlers_touch_no_files(path):
    """The server reads uploads into memory; the only path it opens is the sessions database (sessions.py)."""
    for name, node in calls(path):
        where = f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        assert name not in FILE_IO or (name == "Path" and "checkpoint.path" in ast.unparse(node)), where
        assert name.rsplit(".", 1)[-1] not in PATH_IO, where
        if name == "Image.open":  # only ever on bytes already in memory
            assert ast.unparse(node.args[0]).startswith("io.BytesIO("), where


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_are_not_written_where_the_filename_says(keyed_api, tmp_path, monkeypatch):
    """A hostile upload filename must not create files: not beside us, not along the traversal."""
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    big = _png() + b"\0" * (2 * 2**20)  # over python-multipart's in-memory threshold: spooled to a temp file
    hostile = "../../../../tmp/openbagel-evil.png"
    response = keyed_api.post("/v1/images/edits", headers={"Authorization": "Bearer s3cret"},
                              files={"image": (hostile, big, "image/png")},
                              data={"prompt": "make it blue", "num_inference_steps": "3"})
    assert response.status_code in (200, 400), response.text
    assert set(tmp_path.rglob("*")) == before
    assert not Path("/tmp/openbagel-evil.png").exists()


def test_request_paths_cannot_name_files(keyed_api):
    headers = {"Authorization": "Bearer s3cret"}
    for sid in ("..%2F..%2Fetc%2Fpasswd", "sess_../../etc/passwd", "%2Fetc%2Fpasswd"):
        response = keyed_api.get(f"/v1/sessions/{sid}", headers=headers)
        assert response.status_code == 404 and "root:" not in response.text
    chat = keyed_api.post("/v1/chat/completions", headers=headers, json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}, {"type": "text", "text": "?"}]}]})
    assert chat.status_code == 400 and "data URL" in chat.json()["error"]["message"]
