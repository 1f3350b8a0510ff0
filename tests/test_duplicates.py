"""`imgsearch duplicates` on real photos and edited copies of them, its HTML report, and `delete` fed its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from helpers import fashion_images, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Three photos with edited copies (resized and re-encoded, cropped, brightened), three unrelated photos, and one
    Fashion-MNIST image per class; one copy sits in a folder whose name is HTML. Byte-identical copies of chelsea
    (which has a near-identical neighbour) and of camera (which has none) are files, not rows."""
    from skimage import data

    root = tmp_path_factory.mktemp("dups")
    folder = root / "catalog"
    odd = folder / "<b>odd</b>"
    odd.mkdir(parents=True)
    names = ("chelsea", "coffee", "rocket", "astronaut", "camera", "hubble_deep_field")
    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in names}
    for name, photo in photos.items():
        photo.save(folder / f"{name}.jpg", quality=90)
    chelsea, coffee, rocket = photos["chelsea"], photos["coffee"], photos["rocket"]
    chelsea.resize((chelsea.width // 2, chelsea.height // 2)).save(folder / "chelsea_small.jpg", quality=60)
    width, height = coffee.size
    coffee.crop((width // 20, height // 20, width - width // 20, height - height // 20)).save(odd / "coffee_cropped.jpg")
    ImageEnhance.Brightness(rocket).enhance(1.15).save(folder / "rocket_brighter.png")
    (folder / "again").mkdir()
    (folder / "again" / "chelsea.jpg").write_bytes((folder / "chelsea.jpg").read_bytes())
    (folder / "again" / "camera.jpg").write_bytes((folder / "camera.jpg").read_bytes())
    for image in fashion_images(per_class=1):
        (folder / image.parent.name).mkdir(exist_ok=True)
        (folder / image.parent.name / image.name).write_bytes(image.read_bytes())
    uri = str(root / "dups.db")
    run_cli(["ingest", str(folder), "--uri", uri], check=True)
    return root, folder, uri


def groups_by_name(report: dict) -> dict[str, dict[str, str]]:
    """{representative file name: {member file name: grade}}"""
    return {
        Path(group["representative"]["path"]).name: {Path(m["path"]).name: m["grade"] for m in group["members"]}
        for group in report["groups"]
    }


def test_edited_copies_are_grouped_with_their_photo_as_near_identical(catalog):
    root, folder, uri = catalog
    report = json.loads(run_cli(["duplicates", "--uri", uri, "--json"], check=True).stdout)
    assert report["rows"] == 19 and report["thresholds"] == {"near-identical": 0.9, "similar": 0.85}
    pairs = {frozenset((rep, member)): grade for rep, members in groups_by_name(report).items() for member, grade in members.items()}
    for photo, copy in (("chelsea.jpg", "chelsea_small.jpg"), ("coffee.jpg", "coffee_cropped.jpg"), ("rocket.jpg", "rocket_brighter.png")):
        assert pairs.get(frozenset((photo, copy))) == "near-identical", (photo, copy, report["groups"])
    photos = {"chelsea", "coffee", "rocket", "astronaut", "camera", "hubble"}
    for pair in pairs:  # two different photos are never grouped
        stems = {Path(name).stem.split("_")[0] for name in pair}
        assert len(stems & photos) <= 1 or len(stems) == 1, pair
    for group in report["groups"]:
        for member in group["members"]:
            if member["copy_of"] is None:
                assert member["score"] >= 0.85 and member["grade"] == ("near-identical" if member["score"] >= 0.9 else "similar")


def test_identical_bytes_are_one_row_and_reported_as_identical_content(catalog):
    root, folder, uri = catalog
    report = json.loads(run_cli(["duplicates", "--uri", uri, "--json"], check=True).stdout)
    copies = {m["path"]: (g["representative"], m) for g in report["groups"] for m in g["members"] if m["copy_of"]}
    assert set(copies) == {str(folder / "again" / "chelsea.jpg"), str(folder / "again" / "camera.jpg")}
    for copy, (representative, member) in copies.items():
        name = Path(copy).name
        assert member["copy_of"] == representative["path"] == str(folder / name)  # the row's own path
        assert member["id"] == representative["id"] and member["grade"] == "identical content" and member["score"] == 1.0
    camera = next(g for g in report["groups"] if g["representative"]["path"] == str(folder / "camera.jpg"))
    assert [m["path"] for m in camera["members"]] == [str(folder / "again" / "camera.jpg")]  # a group of its own
    text = run_cli(["duplicates", "--uri", uri], check=True).stdout
    assert "2 identical," in text and "identical content" in text
    # a second ingest records nothing new and changes no row
    again = json.loads(run_cli(["ingest", str(folder), "--uri", uri, "--json"], check=True).stdout)
    assert again["copies"] == 0 and again["indexed"] == again["updated"] == 0


def test_a_path_prefix_and_a_threshold_narrow_the_search(catalog):
    root, folder, uri = catalog
    relative = ["duplicates", "catalog/<b>odd</b>", "--uri", uri, "--json"]  # a folder on disk, as given
    only_odd = json.loads(run_cli(relative, cwd=root, check=True).stdout)
    assert only_odd["rows"] == 1 and only_odd["groups"] == []  # its photo is outside the prefix
    strict = json.loads(run_cli(["duplicates", "--uri", uri, "--threshold", "0.995", "--json"], check=True).stdout)
    assert all(member["score"] >= 0.995 for group in strict["groups"] for member in group["members"])
    assert len(strict["groups"]) < len(json.loads(run_cli(["duplicates", "--uri", uri, "--json"], check=True).stdout)["groups"])


def test_the_html_report_shows_thumbnails_with_escaped_paths(catalog, tmp_path):
    root, folder, uri = catalog
    page = tmp_path / "report.html"
    result = run_cli(["duplicates", "--uri", uri, "--html", str(page)], check=True)
    assert "near-identical" in result.stdout and f"wrote {page}" in result.stdout
    text = page.read_text()
    assert text.count("<img src='data:image/jpeg;base64,") >= 6
    assert "&lt;b&gt;odd&lt;/b&gt;/coffee_cropped.jpg" in text and "<b>odd</b>" not in text


def test_duplicates_json_piped_into_delete_removes_the_copies_and_keeps_files(catalog, tmp_path):
    root, folder, uri = catalog
    found = run_cli(["duplicates", "--uri", uri, "--threshold", "0.9", "--json"], check=True).stdout
    listing = tmp_path / "dups.json"
    listing.write_text(found)
    groups = json.loads(found)["groups"]
    members = [m for group in groups for m in group["members"] if not m["copy_of"]]
    representatives = {group["representative"]["id"] for group in groups}
    dry = json.loads(run_cli(["delete", "--from-json", str(listing), "--uri", uri, "--dry-run", "--json"], check=True).stdout)
    assert dry["dry_run"] and {row["id"] for row in dry["deleted"]} == {m["id"] for m in members}
    assert dry["copies_skipped"] == 2 and not representatives & {row["id"] for row in dry["deleted"]}
    assert json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["count"] == 19  # nothing changed
    done = json.loads(run_cli(["delete", "--from-json", str(listing), "--uri", uri, "--json"], check=True).stdout)
    assert len(done["deleted"]) == len(members) and not any(row["file_removed"] for row in done["deleted"])
    assert json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["count"] == 19 - len(members)
    assert all(Path(m["path"]).is_file() for m in members)  # catalog files are the user's
    again = json.loads(run_cli(["duplicates", "--uri", uri, "--threshold", "0.9", "--json"], check=True).stdout)
    left = [m for group in again["groups"] for m in group["members"]]
    assert {m["path"] for m in left} == {str(folder / "again" / "chelsea.jpg"), str(folder / "again" / "camera.jpg")}
    assert all(m["grade"] == "identical content" for m in left)  # only the files that share a kept row's bytes
    # re-ingesting brings the copies back: nothing else was lost
    run_cli(["ingest", str(folder), "--uri", uri], check=True)
    assert json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["count"] == 19
