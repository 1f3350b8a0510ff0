"""The machinery every command shares (imgsearch/shell.py): options declared once, settings errors as one line,
Output printed as text or JSON, exit statuses. No model and no Milvus: the fast tier."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from imgsearch.cli import app
from imgsearch.config import Settings
from imgsearch.errors import CatalogError
from imgsearch.shell import Output, command_registrar

runner = CliRunner()


def test_every_command_takes_the_shared_options_it_needs():
    encoding = ("ingest", "search", "enroll", "recognize", "eval", "reindex", "serve")
    for name in encoding + ("info", "export", "train-head"):
        shown = runner.invoke(app, [name, "--help"], terminal_width=200).output
        assert "--uri" in shown and "--collection" in shown, name
        assert ("--runtime" in shown) == (name in encoding), name
        assert ("--json" in shown) == (name != "serve"), name
    ingest_help = runner.invoke(app, ["ingest", "--help"], terminal_width=200).output
    assert Settings.model_fields["batch_size"].description in ingest_help  # the help is the setting's description
    assert "IMGSEARCH_BATCH_SIZE" in ingest_help


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["ingest", str(tmp_path)], env={"IMGSEARCH_BATCH_SIZE": "many"})
    assert result.exit_code == 2
    assert "invalid setting (batch_size" in result.output and "Traceback" not in result.output


def test_a_bad_recognition_method_is_refused_before_anything_loads(tmp_path):
    result = runner.invoke(app, ["recognize", str(tmp_path), "--method", "vote", "--uri", str(tmp_path / "none.db")])
    assert result.exit_code == 2 and "knn" in result.output
    assert not (tmp_path / "none.db").exists()


@pytest.fixture
def toy() -> typer.Typer:
    toy = typer.Typer()
    command = command_registrar(toy)

    @command("report", settings=("collection",))
    def report(settings: Settings, fail: bool = False, broken: bool = False) -> Output:
        if broken:
            raise CatalogError("the catalog [red]is[/red] gone")
        failed = [{"path": "bad\x1b[31m.jpg", "error": "not an image"}] if fail else []
        return Output({"collection": settings.collection_name}, f"collection {settings.collection_name}", failed=failed)

    @command("other")
    def other(settings: Settings) -> Output:
        return Output({})

    return toy


def test_output_is_text_or_json_and_failures_make_exit_3(toy):
    text = runner.invoke(toy, ["report", "--collection", "shop"])
    assert text.exit_code == 0 and text.output.strip() == "collection shop"
    as_json = runner.invoke(toy, ["report", "--collection", "shop", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output) == {"collection": "shop"}
    partial = runner.invoke(toy, ["report", "--fail"])
    assert partial.exit_code == 3
    assert "skipped bad\\x1b[31m.jpg: not an image" in partial.output  # shown, not obeyed
    assert "\x1b[31m" not in partial.output


def test_user_errors_are_one_line_with_markup_shown(toy):
    broken = runner.invoke(toy, ["report", "--broken"])
    assert broken.exit_code == 2
    assert broken.output.strip() == "error: the catalog [red]is[/red] gone"
