"""`imgsearch duplicates` on real photos, edited copies of them and look-alike products: its grades and evidence, its
HTML report, and `delete` fed its JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, ImageOps

from helpers import FASHION_DIR, fashion_images, run_cli

pytestmark = pytest.mark.slow
# Different products of one class that the embedding scores >= 0.93 (ankle boots) and 0.93 (trousers): look-alikes.
LOOKALIKES = (("ankle_boot", "ankle_boot_027.png", "ankle_boot_023.png"), ("trouser", "trouser_009.png", "trouser_029.png"))
# Each edited copy, its photo, and words its evidence holds whichever of the two is the group's representative.
EDITED = {
    "chelsea_small.jpg": ("chelsea.jpg", "resized to"),
    "coffee_cropped.jpg": ("coffee.jpg", "cropped to 90%"),
    "rocket_brighter.png": ("rocket.jpg", "re-encoded or retouched"),
    "astronaut_mirrored.jpg": ("astronaut.jpg", "mirrored"),
    "coins_turned.jpg": ("coins.jpg", "rotated 90°"),
    "immunohistochemistry_cropped.jpg": ("immunohistochemistry.jpg", "cropped to 70%"),
}


def jpeg(image: Image.Image, path: Path, quality: int) -> None:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Eight photos, six edited copies (resized and re-encoded, cropped by 10% and to 70%, brightened, mirrored,
    turned by 90°), one Fashion-MNIST image per class and two look-alike pairs of products; one copy sits in a folder
    whose name is HTML. Byte-identical copies of chelsea (which has an edited copy) and of camera (which has none) are
    files, not rows."""
    from skimage import data

    root = tmp_path_factory.mktemp("dups")
    folder = root / "catalog"
    odd = folder / "<b>odd</b>"
    odd.mkdir(parents=True)
    names = ("chelsea", "coffee", "rocket", "astronaut", "camera", "hubble_deep_field", "coins", "immunohistochemistry")
    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in names}
    for name, photo in photos.items():
        photo.save(folder / f"{name}.jpg", quality=90)
    chelsea, coffee, rocket = photos["chelsea"], photos["coffee"], photos["rocket"]
    chelsea.resize((chelsea.width // 2, chelsea.height // 2)).save(folder / "chelsea_small.jpg", quality=60)
    width, height = coffee.size
    coffee.crop((width // 20, height // 20, width - width // 20, height - height // 20)).save(odd / "coffee_cropped.jpg")
    ImageEnhance.Brightness(rocket).enhance(1.15).save(folder / "rocket_brighter.png")
    jpeg(ImageOps.mirror(photos["astronaut"]), folder / "astronaut_mirrored.jpg", 70)
    jpeg(photos["coins"].transpose(Image.ROTATE_90), folder / "coins_turned.jpg", 85)
    cells = photos["immunohistochemistry"]
    jpeg(cells.crop((int(cells.width * 0.3), int(cells.height * 0.3), cells.width, cells.height)), folder / "immunohistochemistry_cropped.jpg", 85)
    (folder / "again").mkdir()
    (folder / "again" / "chelsea.jpg").write_bytes((folder / "chelsea.jpg").read_bytes())
    (folder / "again" / "camera.jpg").write_bytes((folder / "camera.jpg").read_bytes())
    products = fashion_images(per_class=1) + [FASHION_DIR / kind / name for kind, *names in LOOKALIKES for name in names]
    for image in products:
        (folder / image.parent.name).mkdir(exist_ok=True)
        (folder / image.parent.name / image.name).write_bytes(image.read_bytes())
    uri = str(root / "dups.db")
    run_cli(["ingest", str(folder), "--uri", uri], check=True)
    return root, folder, uri


ROWS = 8 + 6 + 10 + 4  # photos, edited copies, products (the byte-identical copies are not rows)


def groups_by_name(report: dict, key: str = "groups") -> dict[str, dict[str, dict]]:
    """{representative file name: {member file name: member}}"""
    return {
        Path(group["representative"]["path"]).name: {Path(m["path"]).name: m for m in group["members"]}
        for group in report[key]
    }


def pairs_of(report: dict, key: str = "groups") -> dict[frozenset, dict]:
    return {frozenset((rep, name)): member for rep, members in groups_by_name(report, key).items() for name, member in members.items()}


def test_edited_copies_are_the_same_picture_edited_with_evidence_and_look_alikes_are_not(catalog):
    root, folder, uri = catalog
    report = json.loads(run_cli(["duplicates", "--uri", uri, "--json"], check=True).stdout)
    assert report["rows"] == ROWS and report["thresholds"] == {"candidates": 0.5, "similar": 0.85}
    assert "similar" not in report  # look-alikes are opt-in
    pairs = pairs_of(report)
    for copy, (photo, words) in EDITED.items():
        member = pairs.get(frozenset((photo, copy)))
        assert member and member["grade"] == "same picture edited" and words in member["evidence"], (photo, copy, report["groups"])
    products = {kind for kind, *_ in LOOKALIKES} | {path.parent.name for path in fashion_images(per_class=1)}
    grouped = {name for pair in pairs for name in pair} | set(groups_by_name(report))
    assert not {name for name in grouped if name.split("_0")[0] in products}, grouped  # no product is a copy of another
    stems = {name.split("_")[0].split(".")[0] for name in grouped}
    for pair in pairs:  # two different photos are never grouped
        assert len({name.split("_")[0].split(".")[0] for name in pair}) == 1, pair
    assert stems <= {"chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "immunohistochemistry"}
    assert report["pairs"]["candidates"] > report["pairs"]["verified"] >= len(EDITED)  # the products' pairs were checked

    asked = json.loads(run_cli(["duplicates", "--uri", uri, "--similar", "--json"], check=True).stdout)
    assert asked["groups"] == report["groups"]
    lookalikes = pairs_of(asked, "similar")
    for _, first, second in LOOKALIKES:
        member = lookalikes.get(frozenset((first, second)))
        assert member and member["grade"] == "similar" and member["score"] >= 0.9 and member["evidence"] is None, (first, second, asked["similar"])


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
    assert "2 identical and" in text and "identical content" in text
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
    assert "same picture edited" in result.stdout and f"wrote {page}" in result.stdout
    text = page.read_text()
    assert text.count("<img src='data:image/jpeg;base64,") >= 6
    assert "same picture edited" in text and "rotated 90°" in text and "cropped to 70%" in text  # the verifier's evidence
    assert "&lt;b&gt;odd&lt;/b&gt;/coffee_cropped.jpg" in text and "<b>odd</b>" not in text


def test_duplicates_json_piped_into_delete_removes_the_copies_and_keeps_files(catalog, tmp_path):
    root, folder, uri = catalog
    stored = [path for path in folder.rglob("*") if path.is_file() and path.parent.name != "again"]
    # the look-alikes listed too: without --include-similar, delete takes only the verified grades
    asked = tmp_path / "with-similar.json"
    asked.write_text(run_cli(["duplicates", "--uri", uri, "--similar", "--json"], check=True).stdout)
    lookalike_ids = {m["id"] for group in json.loads(asked.read_text())["similar"] for m in group["members"]}
    skipped = json.loads(run_cli(["delete", "--from-json", str(asked), "--uri", uri, "--dry-run", "--json"], check=True).stdout)
    assert skipped["similar_skipped"] >= len(LOOKALIKES) and not lookalike_ids & {row["id"] for row in skipped["deleted"]}

    found = run_cli(["duplicates", "--uri", uri, "--json"], check=True).stdout
    listing = tmp_path / "dups.json"
    listing.write_text(found)
    groups = json.loads(found)["groups"]
    members = [m for group in groups for m in group["members"] if not m["copy_of"]]
    representatives = {group["representative"]["id"] for group in groups}
    dry = json.loads(run_cli(["delete", "--from-json", str(listing), "--uri", uri, "--dry-run", "--json"], check=True).stdout)
    assert dry["dry_run"] and {row["id"] for row in dry["deleted"]} == {m["id"] for m in members} == {row["id"] for row in skipped["deleted"]}
    assert dry["copies_skipped"] == 2 and dry["similar_skipped"] == 0 and not representatives & {row["id"] for row in dry["deleted"]}
    assert len(members) == len(EDITED)  # one of each photo and its edited copy: nothing else
    assert json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["count"] == ROWS  # nothing changed
    done = json.loads(run_cli(["delete", "--from-json", str(listing), "--uri", uri, "--json"], check=True).stdout)
    assert len(done["deleted"]) == len(members) == len(EDITED) and not any(row["file_removed"] for row in done["deleted"])
    assert json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["count"] == ROWS - len(members)
    assert all(path.is_file() for path in stored)  # catalog files are the user's
    again = json.loads(run_cli(["duplicates", "--uri", uri, "--json"], check=True).stdout)
    left = [m for group in again["groups"] for m in group["members"]]
    assert {m["path"] for m in left} == {str(folder / "again" / "chelsea.jpg"), str(folder / "again" / "camera.jpg")}
    assert all(m["grade"] == "identical content" for m in left)  # only the files that share a kept row's bytes
    # re-ingesting brings the copies back: nothing else was lost
    run_cli(["ingest", str(folder), "--uri", uri], check=True)
    assert json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["count"] == ROWS


def test_files_that_cannot_be_read_leave_their_pairs_unverified_and_are_counted(tmp_path):
    """Rows whose files are gone (or were never images) are never called copies, however close their vectors: the
    report counts them and names the first few, and with --similar lists the pair as a look-alike."""
    import numpy as np

    from imgsearch.duplicates import UNREADABLE_SHOWN, find_duplicates
    from imgsearch.store import ImageRecord, MilvusStore

    (tmp_path / "not-an-image.jpg").write_bytes(b"plain text")
    paths = [str(tmp_path / "gone.jpg"), str(tmp_path / "not-an-image.jpg")]
    vector = np.ones(8, dtype=np.float32) / np.sqrt(8)
    store = MilvusStore(str(tmp_path / "u.db"), "unreadable", model="none", dim=8, precision="fp32")
    store.upsert([ImageRecord(id=f"{i:064x}", vector=vector, path=path) for i, path in enumerate(paths)])
    store.flush()
    report = find_duplicates(store, include_similar=True)
    assert report.groups == [] and report.unreadable_count == 2 and sorted(report.unreadable) == sorted(paths)
    assert [(m.grade, m.score > 0.99) for g in report.lookalikes for m in g.members] == [("similar", True)]
    assert report.to_dict()["unreadable_count"] == 2 and len(report.to_dict()["unreadable"]) <= UNREADABLE_SHOWN
    store.close()
