"""The settings module is the one reader of OSTEOSCREEN_* variables: typed, bounded, validated at start, and the
README's table is generated from it."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from osteoscreen import settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    assert settings.readme_with_table(readme) == readme, (
        "README.md's settings table differs from osteoscreen/settings.py: run `python -m osteoscreen.settings README.md`")
    for field in settings.Settings.model_fields:
        assert f"`{settings.variable(field)}`" in readme


def test_defaults_parse_and_spellings_a_person_means():
    s = settings.load({})
    assert (s.max_queue, s.intended_use, s.j2k_reduce, s.cpus, s.grpc_port) == (64, "refuse", True, None, 50051)
    s = settings.load({"OSTEOSCREEN_MAX_PIXELS": "1_000_000", "OSTEOSCREEN_INTENDED_USE": " Flag ",
                       "OSTEOSCREEN_J2K_REDUCE": "off", "OSTEOSCREEN_GPU": "1", "OSTEOSCREEN_CPUS": "2.5",
                       "OSTEOSCREEN_MAX_QUEUE": ""})  # empty means unset
    assert (s.max_pixels, s.intended_use, s.j2k_reduce, s.accelerator, s.cpus, s.max_queue) == (
        1_000_000, "flag", False, {"gpu": 1}, 2.5, 64)
    with pytest.raises(pydantic.ValidationError):
        s.max_queue = 3  # frozen: nothing changes a setting behind the validation


@pytest.mark.parametrize(("name", "value", "accepts"), [
    ("OSTEOSCREEN_MAX_QUEUE", "lots", "an integer >= 1"),
    ("OSTEOSCREEN_MAX_QUEUE", "0", "an integer >= 1"),
    ("OSTEOSCREEN_DECODE_THREADS", "-1", "an integer >= 0"),
    ("OSTEOSCREEN_GRPC_PORT", "70000", "an integer >= 0 and <= 65535"),
    ("OSTEOSCREEN_CPUS", "0", "a number > 0"),
    ("OSTEOSCREEN_PRECISION", "half", "auto or float32 or bfloat16"),
    ("OSTEOSCREEN_GPU", "maybe", "1 or 0"),
])
def test_a_bad_value_names_the_variable_and_what_it_accepts(name, value, accepts):
    with pytest.raises(settings.SettingsError) as caught:
        settings.load({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}={value!r} is not valid: it accepts {accepts}") and "\n" not in message


def test_a_misspelt_name_is_a_warning_with_the_nearest_setting(caplog):
    with caplog.at_level(logging.WARNING, logger="osteoscreen.settings"):
        assert settings.load({"OSTEOSCREEN_MAXQUEUE": "3"}).max_queue == 64
    assert "OSTEOSCREEN_MAXQUEUE is not a setting (did you mean OSTEOSCREEN_MAX_QUEUE?)" in caplog.text


def test_current_follows_the_environment_and_parses_each_once(monkeypatch):
    monkeypatch.setenv("OSTEOSCREEN_MAX_QUEUE", "7")
    first = settings.current()
    assert first.max_queue == 7 and settings.current() is first
    monkeypatch.setenv("OSTEOSCREEN_MAX_QUEUE", "8")
    assert settings.current().max_queue == 8


def _environment_reads(tree: ast.AST) -> list[ast.AST]:
    """The keys of `os.environ.get(k)`, `os.getenv(k)` and `os.environ[k]`, in source order."""
    keys = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            target = ast.unparse(node.func)
            if target in ("os.environ.get", "os.getenv", "environ.get"):
                keys.append(node.args[0])
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
            keys.append(node.slice)
    return sorted(keys, key=lambda k: (k.lineno, k.col_offset))


def test_no_other_module_reads_an_osteoscreen_variable():
    offenders = []
    for path in [REPO / "service.py", *sorted((REPO / "osteoscreen").rglob("*.py")),
                 *sorted((REPO / "training").rglob("*.py"))]:
        if "_generated" in path.parts or path == REPO / "osteoscreen" / "settings.py":
            continue
        for key in _environment_reads(ast.parse(path.read_text())):
            # a constant naming another program's variable (KERAS_HOME, OMP_NUM_THREADS) is fine; a computed
            # key or one of ours is a second reader of the settings
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)) or key.value.startswith("OSTEOSCREEN_"):
                offenders.append(f"{path.relative_to(REPO)}:{key.lineno}: {ast.unparse(key)}")
    assert not offenders, "read through osteoscreen.settings instead:\n" + "\n".join(offenders)


def test_the_scan_finds_a_second_reader():
    tree = ast.parse("import os\nq = int(os.environ.get('OSTEOSCREEN_MAX_QUEUE', '64'))\nn = os.environ[name]\n")
    assert [ast.unparse(k) for k in _environment_reads(tree)] == ["'OSTEOSCREEN_MAX_QUEUE'", "name"]


def test_a_bad_value_stops_the_cli_and_bentoml_serve_with_one_line(tmp_path):
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", "OSTEOSCREEN_MAX_QUEUE": "lots"}
    line = "OSTEOSCREEN_MAX_QUEUE='lots' is not valid: it accepts an integer >= 1"
    cli = subprocess.run([str(BIN / "osteoscreen"), "synth", "--out", str(tmp_path / "d"), "--n", "4"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and cli.stderr.strip() == f"osteoscreen synth: error: {line}", cli.stderr[-2000:]
    assert not (tmp_path / "d").exists(), "the command ran although a setting was bad"
    serve = subprocess.run([str(BIN / "bentoml"), "serve", "service:Screening", "--port", "0"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=180)
    assert serve.returncode != 0 and f"osteoscreen: cannot start: {line}" in serve.stderr, serve.stderr[-2000:]
    assert "Traceback" not in serve.stderr, serve.stderr[-2000:]
