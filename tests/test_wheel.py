"""The built wheel, installed into a fresh virtual environment away from the source tree, ingests and serves: the
page comes from package data and a search is answered over HTTP. (The Docker image installs this same wheel.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, fashion_images, free_port, healthy_client

pytestmark = pytest.mark.slow

SOURCES = ("pyproject.toml", "setup.py", "README.md", "imgsearch", "ingest", "api")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources, so the repository gets no build/ or egg-info and nothing untracked leaks in."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)])
    [built] = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A new venv holding only the wheel. Its dependencies (torch alone is gigabytes) are borrowed from the test
    environment's site-packages through a .pth line, which Python reads after the venv's own site-packages, so
    `imgsearch` can only come from the wheel."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    site_packages = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site_packages / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def run(command: list[str], **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_holds_one_import_package_and_the_page(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"imgsearch"}
    assert {"imgsearch/api/static/index.html", "imgsearch/ingest/pipeline.py", "imgsearch/api/app.py"} <= set(names)
    assert not any(name.startswith(("api/", "ingest/", "tests/")) for name in names)


def test_every_source_package_is_in_the_wheel(wheel):
    """Packages are discovered (setup.py): a sub-package added later cannot be left out, as imgsearch.evaluation was."""
    names = set(zipfile.ZipFile(wheel).namelist())
    installed_as = {"imgsearch": "imgsearch", "ingest": "imgsearch/ingest", "api": "imgsearch/api"}
    expected = {
        f"{installed_as[folder]}/{init.parent.relative_to(ROOT / folder).as_posix()}/__init__.py".replace("/./", "/")
        for folder in installed_as for init in (ROOT / folder).rglob("__init__.py") if "__pycache__" not in init.parts
    }
    assert "imgsearch/evaluation/__init__.py" in expected and expected <= names, sorted(expected - names)


def test_every_command_of_the_installed_wheel_runs(fresh_venv, tmp_path):
    """--help lists every command, then eval on a tiny labeled folder, recognize, duplicates and review, all from the
    wheel (`imgsearch eval` failed there with ModuleNotFoundError)."""
    import json

    import typer

    from helpers import copy_fashion_catalog
    from imgsearch.cli import app

    imgsearch = str(fresh_venv / "bin" / "imgsearch")
    env = {**os.environ, "IMGSEARCH_MILVUS_URI": str(tmp_path / "w.db"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    commands = sorted(typer.main.get_command(app).commands)
    assert {"eval", "recognize", "duplicates", "review", "ingest", "export", "import"} <= set(commands)
    listed = run([imgsearch, "--help"], cwd=tmp_path, env=env)  # the installed CLI offers every command of the source
    assert all(f" {name} " in listed for name in commands), listed
    data = tmp_path / "data"
    copy_fashion_catalog(data, 4)
    run([imgsearch, "eval", str(data), "--out", str(tmp_path / "report"), "--shots", "1,2", "--references-per-class", "3"], cwd=tmp_path, env=env)
    assert json.loads((tmp_path / "report" / "report.json").read_text())
    run([imgsearch, "ingest", str(data)], cwd=tmp_path, env=env)
    [answer] = json.loads(run([imgsearch, "recognize", str(data / "bag" / "bag_000.png"), "--json", "--keep-unknown"], cwd=tmp_path, env=env))
    assert answer["path"].endswith("bag_000.png")
    assert json.loads(run([imgsearch, "duplicates", "--json"], cwd=tmp_path, env=env))["rows"] == 40
    assert isinstance(json.loads(run([imgsearch, "review", "--json"], cwd=tmp_path, env=env)), list)


def test_the_installed_wheel_ingests_serves_the_page_and_answers_a_search(fresh_venv, tmp_path):
    work = tmp_path / "work"  # not the repository: nothing there can be imported by accident
    catalog = work / "catalog"
    photos = fashion_images(per_class=1)
    for photo in photos:
        (catalog / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, catalog / photo.parent.name / photo.name)
    env = {
        **os.environ, "IMGSEARCH_MILVUS_URI": str(work / "wheel.db"), "IMGSEARCH_API_KEY": "wheel-key",
        "IMGSEARCH_RUNTIME": "torch", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
    }
    bin_dir = fresh_venv / "bin"
    where = run([str(bin_dir / "python"), "-c", "import imgsearch.api.app as a; print(a.__file__)"], cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(fresh_venv), where
    run([str(bin_dir / "imgsearch"), "ingest", str(catalog)], cwd=work, env=env)

    port = free_port()
    server = subprocess.Popen(
        [str(bin_dir / "imgsearch"), "serve", "--port", str(port)], cwd=work, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        with healthy_client(port, server) as client:
            headers = {"X-API-Key": "wheel-key"}
            page = client.get("/", headers=headers)
            assert page.status_code == 200 and "<html" in page.text.lower()
            assert client.get("/app.js", headers=headers).status_code == 200
            query = photos[3]
            answer = client.post(
                "/search", headers=headers, data={"k": "3"},
                files={"image": (query.name, query.read_bytes(), "image/png")},
            )
            assert answer.status_code == 200, answer.text
            best = answer.json()["results"][0]
            assert best["label"] == query.parent.name and best["score"] > 0.99
            assert best["path"] == f"{query.parent.name}/{query.name}"  # relative to the catalog folder
    finally:
        server.terminate()
        server.wait(timeout=60)
