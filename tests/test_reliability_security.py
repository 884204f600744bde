"""Security basics, checked on the code itself: no code-executing deserialisation, loopback
binds by default, admin secrets only from the environment, bounded message and request sizes.

The scan is an AST walk of every product module (not a text grep, so comments and strings
that *mention* pickle do not count, and ``model.eval()`` is not ``eval``).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("streams", "features", "online_learner", "serving", "infra", "bench")
#: Modules whose loading can run code from the data they read.
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def _modules() -> list[Path]:
    return sorted(p for d in PRODUCT for p in (REPO / d).rglob("*.py") if "repo/data" not in str(p))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _violations(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            out.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                out.append(f"{name}()")
            elif name.endswith("torch.load"):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append("torch.load without weights_only=True")
            elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
                loader = _kw(node, "Loader")
                if name != "yaml.load" or loader is None or "Safe" not in _dotted(loader):
                    out.append(f"{name} without SafeLoader")
            elif name in ("np.load", "numpy.load"):
                ap = _kw(node, "allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    out.append("np.load(allow_pickle=True)")
            elif name.endswith("read_pickle") or name.endswith("torch.jit.load"):
                out.append(name)
            elif _kw(node, "shell") is not None and getattr(_kw(node, "shell"), "value", False) is True:
                out.append(f"{name}(shell=True)")
    return out


def test_no_code_executing_deserialisation_anywhere() -> None:
    found = {}
    for path in _modules():
        bad = _violations(ast.parse(path.read_text(), filename=str(path)))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    assert not found, f"code-executing formats or dynamic code: {found}"


def test_the_scanner_catches_what_it_looks_for() -> None:
    src = ("import pickle\nimport torch, yaml\nfrom dill import loads\ntorch.load(f)\nyaml.load(s)\neval(x)\n"
           "torch.load(f, weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\nmodel.eval()\n"
           "subprocess.run(c, shell=True)\n")
    assert _violations(ast.parse(src)) == ["import pickle", "from dill import ...",
                                           "torch.load without weights_only=True", "yaml.load without SafeLoader",
                                           "eval()", "subprocess.run(shell=True)"]


# ----------------------------------------------------------------------------- binds
def _default(fn, name: str) -> object:
    return inspect.signature(fn).parameters[name].default


def test_every_listener_binds_loopback_by_default() -> None:
    from ctr.features.cli import serve as features_serve
    from ctr.features.store import serve_command as feast_serve_command
    from ctr.infra.broker import EmbeddedBroker, broker_command
    from ctr.serving.cli import serve_command
    from ctr.serving.config import ServingConfig

    assert ServingConfig().host == "127.0.0.1"
    # `ctr serve` and `python -m ctr.serving` are one function
    assert _default(serve_command, "host") == "127.0.0.1"
    assert _default(features_serve, "host") == "127.0.0.1"
    assert _default(feast_serve_command, "host") == "127.0.0.1"
    assert EmbeddedBroker().host == "127.0.0.1"
    for kind in ("noida", "tansu"):
        argv = " ".join(broker_command(kind, "127.0.0.1", 9, Path("/tmp/x")))
        assert "0.0.0.0" not in argv and "127.0.0.1" in argv


def test_metrics_and_faust_web_listeners_default_to_loopback() -> None:
    """Prometheus exporters bind ``$CTR_BIND`` (default loopback); Faust's web server loopback."""
    for mod in ("streams/worker.py", "streams/reweighting.py", "online_learner/trainer.py"):
        tree = ast.parse((REPO / mod).read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _dotted(n.func) == "start_http_server"]
        assert calls, mod
        for call in calls:
            addr = _kw(call, "addr")
            assert addr is not None, f"{mod}: start_http_server without addr binds 0.0.0.0"
            assert "127.0.0.1" in ast.unparse(addr), f"{mod}: {ast.unparse(addr)}"
    assert 'web_host="127.0.0.1"' in (REPO / "streams/app.py").read_text()


# ----------------------------------------------------------------------------- secrets
def test_the_admin_token_comes_only_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctr.infra.cli_options import run_command
    from ctr.serving.cli import serve_command
    from ctr.serving.config import ServingConfig
    from ctr.serving.state import ServingState

    assert ServingConfig().admin_token is None  # no built-in default
    assert not [p for p in inspect.signature(serve_command).parameters if "token" in p or "secret" in p]
    with pytest.raises(SystemExit) as exit_:  # not a command-line option (it would show in ps)
        run_command(serve_command, "python -m ctr.serving", ["--admin-token", "x"])
    assert exit_.value.code == 2
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "from-env")
    assert ServingState(ServingConfig(), features=object()).admin_token == "from-env"
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "")
    assert ServingState(ServingConfig(), features=object()).admin_token is None  # empty = admin disabled


def test_no_hard_coded_credentials_in_product_code() -> None:
    """String literals assigned to names like password/token/secret/api_key are refused."""
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)):
                continue
            if not isinstance(node.value.value, str) or not node.value.value:
                continue
            for target in node.targets:
                name = _dotted(target).lower() if isinstance(target, (ast.Name, ast.Attribute)) else ""
                if any(w in name for w in ("password", "passwd", "secret", "api_key", "token")):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not found, found


# ----------------------------------------------------------------------------- size limits
def test_sizes_are_bounded_at_every_entry() -> None:
    from ctr.infra.kafka_io import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS
    from ctr.infra.schema import MAX_FIELDS, MAX_ID_LEN, MAX_MESSAGE_BYTES
    from ctr.online_learner.update_format import MAX_HEADER_BYTES, MAX_PART_BYTES
    from ctr.serving.config import ServingConfig

    assert MAX_MESSAGE_BYTES == 64 * 1024 and MAX_FIELDS == 256 and MAX_ID_LEN == 256
    assert ServingConfig().max_body_bytes <= 1 << 20 and ServingConfig().max_candidates <= 1000
    assert MAX_HEADER_BYTES <= 1 << 20 and MAX_PART_BYTES < PRODUCER_DEFAULTS["message.max.bytes"]
    assert CONSUMER_DEFAULTS["fetch.max.bytes"] <= 64 * 1024 * 1024
