""""unknown" out of the box: ingest, enrol and recognise through the CLI with no `eval`, and the threshold the
references calibrate themselves (recognition/abstention.py) on the real sample catalog and Lite0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import FASHION_DIR, ROOT, auto_cpu_precision, run_cli

pytestmark = pytest.mark.slow

KNOWN = ["ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "sneaker", "trouser"]
LATE = "tshirt"  # enrolled after the ingest, from 5 photos
# "shirt" is never enrolled


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("abstain")
    catalog, held_out = root / "catalog", []
    for name in KNOWN:
        files = sorted((FASHION_DIR / name).glob("*.png"))
        (catalog / name).mkdir(parents=True)
        for source in files[:20]:
            shutil.copy(source, catalog / name / source.name)
        held_out += [(name, str(path)) for path in files[20:]]
    uri = str(root / "shop.db")
    ingested = json.loads(run_cli(["ingest", str(catalog), "--uri", uri, "--json"], check=True).stdout)
    before = json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["self_calibration"]
    late = sorted((FASHION_DIR / LATE).glob("*.png"))
    (root / "late").mkdir()
    for source in late[:5]:
        shutil.copy(source, root / "late" / source.name)
    enrolled = json.loads(run_cli(["enroll", LATE, str(root / "late"), "--uri", uri, "--json"], check=True).stdout)
    return uri, ingested, before, enrolled, held_out + [(LATE, str(path)) for path in late[20:]]


def test_the_threshold_is_recomputed_by_ingest_and_enrolment_and_shown_by_info(shop):
    uri, ingested, before, enrolled, _ = shop
    assert ingested["calibration"] == before and before["references"] == 160 and before["labels"] == 8
    info = json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)
    after = info["self_calibration"]
    assert enrolled["calibration"] == after and after["references"] == 165 and after["labels"] == 9
    assert 0 < after["threshold"] < 1 and info["recognition"] is None  # no eval ran
    table = run_cli(["info", "--uri", uri], check=True).stdout
    assert f"{after['threshold']:.4f}, margin {after['margin']:.4f}, from {after['sample']} of 165" in table


def test_without_eval_a_photo_from_outside_the_catalog_is_unknown_and_the_catalogs_own_images_mostly_are_not(shop):
    uri, *_, held_out = shop
    cat = str(ROOT / "examples" / "queries" / "chelsea_cropped_mirrored.jpg")
    answers = json.loads(run_cli(["recognize", cat, *[path for _, path in held_out], "--uri", uri, "--json"], check=True).stdout)
    assert answers[0]["label"] is None
    assert all(answer["threshold_source"] == "self-calibrated on 165 references (leave-one-out over 165)" for answer in answers)
    known = answers[1:]
    accepted = [(truth, answer["label"]) for (truth, _), answer in zip(held_out, known) if answer["label"] is not None]
    assert len(accepted) >= 0.6 * len(known), len(accepted)
    assert sum(truth == label for truth, label in accepted) >= 0.85 * len(accepted)
    never_enrolled = sorted((FASHION_DIR / "shirt").glob("*.png"))
    shirts = json.loads(run_cli(["recognize", *map(str, never_enrolled), "--uri", uri, "--json"], check=True).stdout)
    unknown_rate = sum(answer["label"] is None for answer in shirts) / len(shirts)
    assert unknown_rate > 1 - len(accepted) / len(known), unknown_rate  # a never-enrolled class abstains more often
    text = run_cli(["recognize", cat, "--uri", uri], check=True)
    assert "unknown" in text.stdout and "self-calibrated on 165 references" in text.stderr


def ingested_four_classes(root) -> str:
    """A Lite file holding 20 references each of trouser, dress, bag and sneaker, ingested by the CLI."""
    catalog = root / "catalog"
    for name in ("trouser", "dress", "bag", "sneaker"):
        (catalog / name).mkdir(parents=True)
        for source in sorted((FASHION_DIR / name).glob("*.png"))[:20]:
            shutil.copy(source, catalog / name / source.name)
    uri = str(root / "four.db")
    run_cli(["ingest", str(catalog), "--uri", uri], check=True)
    return uri


def test_the_enrolment_check_names_the_label_that_photos_enrolled_under_a_wrong_name_belong_to(tmp_path):
    uri = ingested_four_classes(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for source in sorted((FASHION_DIR / "trouser").glob("*.png"))[20:25]:  # trousers, not in the catalog
        shutil.copy(source, wrong / source.name)
    result = run_cli(["enroll", "dress", str(wrong), "--uri", uri, "--json"], check=True)
    check = json.loads(result.stdout)["check"]
    assert check["label"] == "dress" and check["references"] == 5 and check["mean_similarity"] > 0.5
    assert max(check["nearer_elsewhere"], key=check["nearer_elsewhere"].get) == "trouser"
    assert check["nearer_elsewhere"]["trouser"] >= 3 and any("nearer to 'trouser'" in warning for warning in check["warnings"])
    [trouser] = [effect for effect in check["effect"] if effect["label"] == "trouser"]
    assert trouser["references"] == 20 and trouser["accuracy_after"] <= trouser["accuracy_before"]
    table = run_cli(["enroll", "dress", str(wrong), "--uri", uri], check=True)  # again: a no-op, and it says so again
    assert "check: " in table.stderr and "nearer to 'trouser'" in table.stderr


def test_review_keeps_unknown_queries_lists_them_in_groups_and_enrols_a_group(tmp_path):
    from PIL import Image
    from skimage import data

    uri = ingested_four_classes(tmp_path)
    queries = tmp_path / "queries"
    queries.mkdir()
    cat, rocket = Image.fromarray(data.chelsea()), Image.fromarray(data.rocket())
    cat.save(queries / "cat_a.jpg", quality=90)
    cat.crop((20, 10, cat.width - 30, cat.height - 20)).save(queries / "cat_b.jpg", quality=70)
    rocket.save(queries / "rocket.jpg")
    answers = json.loads(run_cli(["recognize", str(queries), "--keep-unknown", "--uri", uri, "--json"], check=True).stdout)
    unknown = sorted(Path(answer["path"]).name for answer in answers if answer["label"] is None)
    assert unknown == ["cat_a.jpg", "cat_b.jpg", "rocket.jpg"]
    groups = json.loads(run_cli(["review", "--uri", uri, "--json"], check=True).stdout)
    assert [sorted(Path(m["path"]).name for m in group["members"]) for group in groups] == [["cat_a.jpg", "cat_b.jpg"], ["rocket.jpg"]]
    assert groups[0]["group"] == 1 and all(m["nearest"] and m["confidence"] < 0.6 for g in groups for m in g["members"])
    main = json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)
    assert main["count"] == 80  # not references
    review = json.loads(run_cli(["info", "--uri", uri, "--collection", main["collection"] + "_review", "--json"], check=True).stdout)
    assert review["precision"] == main["precision"] == auto_cpu_precision()  # made for the encoder the kept vectors came from

    enrolled = json.loads(run_cli(["enroll", "cat", "--from-review", groups[0]["key"], "--uri", uri, "--json"], check=True).stdout)
    assert enrolled["enrolled"] == 2 and enrolled["calibration"]["labels"] == 5 and enrolled["check"]["references"] == 2
    left = json.loads(run_cli(["review", "--uri", uri, "--json"], check=True).stdout)
    assert [[Path(m["path"]).name for m in group["members"]] for group in left] == [["rocket.jpg"]]
    third = tmp_path / "cat_c.jpg"
    cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((0, 0, cat.width - 50, cat.height - 30)).save(third, quality=80)
    [answer] = json.loads(run_cli(["recognize", str(third), "--uri", uri, "--json"], check=True).stdout)
    assert answer["label"] == "cat"
    refused = run_cli(["enroll", "cat", "--from-review", groups[0]["key"], "--uri", uri])
    assert refused.returncode == 2 and f"no review group {groups[0]['key']}" in refused.stderr  # enrolled: gone from the review
    both = run_cli(["enroll", "cat", str(third), "--from-review", groups[1]["key"], "--uri", uri])
    assert both.returncode == 2 and "one of the two" in both.stderr

    # The review is bounded (IMGSEARCH_REVIEW_MAX): with room for one more, of two new unknown photos the first is
    # kept, the second is not and the answer says so; the rocket, already kept, still is.
    more = tmp_path / "more"
    more.mkdir()
    Image.fromarray(data.astronaut()).save(more / "a_astronaut.jpg")
    Image.fromarray(data.coffee()).save(more / "b_coffee.jpg")
    shutil.copy(queries / "rocket.jpg", more / "c_rocket.jpg")
    full = run_cli(["recognize", str(more), "--keep-unknown", "--uri", uri, "--json"], env_extra={"IMGSEARCH_REVIEW_MAX": "2"}, check=True)
    kept = {Path(answer["path"]).name: answer["kept_for_review"] for answer in json.loads(full.stdout)}
    assert kept == {"a_astronaut.jpg": True, "b_coffee.jpg": False, "c_rocket.jpg": True}
    again = run_cli(["recognize", str(more), "--keep-unknown", "--uri", uri], env_extra={"IMGSEARCH_REVIEW_MAX": "2"}, check=True)
    assert "1 unknown images not kept for review: it holds its limit of 2" in again.stderr  # the table's note
    listed = json.loads(run_cli(["review", "--uri", uri, "--json"], check=True).stdout)
    assert sorted(Path(m["path"]).name for g in listed for m in g["members"]) == ["a_astronaut.jpg", "c_rocket.jpg"]  # the same bytes: one row, its newest file


@pytest.mark.parametrize("backend", ["lite"])
def test_concurrent_first_requests_open_the_review_collection_once(make_store, monkeypatch):
    """The service's requests run in threads; two first ones that both opened the review collection left one client
    open, and one could read it while the other was still creating it."""
    import threading
    import time

    from imgsearch.recognition import review

    store = make_store(collection="reviewed")
    real, opened = review.review_store, []

    def slow(store, *, create=True):
        time.sleep(0.3)  # as a server creating, indexing and loading it: the window the first requests met in
        made = real(store, create=create)
        opened.append(made)
        return made

    monkeypatch.setattr(review, "review_store", slow)
    shared = review.OpenedReview(store)
    assert shared.get(create=False) is None and opened == [None]  # not made by a reader; asked again next time
    got = []
    threads = [threading.Thread(target=lambda: got.append(shared.get())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 2 and len(got) == 6 and all(each is opened[1] for each in got), opened
    assert opened[1].collection == store.collection + review.REVIEW_SUFFIX and shared.get(create=False) is opened[1]
    shared.close()


def test_review_selections_are_stable_and_enrolling_stored_content_keeps_its_row(tmp_path):
    """A group is selected by its key, which names its members: a query kept after the listing that joins the group
    makes the old key refused instead of enrolling images nobody looked at. Numbers and malformed selections are
    one line. A kept query whose content is a stored catalog row relabels that row and keeps its path and metadata."""
    from PIL import Image
    from skimage import data

    uri = ingested_four_classes(tmp_path)
    queries = tmp_path / "queries"
    queries.mkdir()
    cat = Image.fromarray(data.chelsea())
    cat.save(queries / "cat_a.jpg", quality=90)
    Image.fromarray(data.rocket()).save(queries / "rocket.jpg")
    run_cli(["recognize", str(queries), "--keep-unknown", "--uri", uri], check=True)
    listed = json.loads(run_cli(["review", "--uri", uri, "--json"], check=True).stdout)
    [cat_group] = [g for g in listed if Path(g["members"][0]["path"]).name == "cat_a.jpg"]
    assert "--from-review g" in run_cli(["review", "--uri", uri], check=True).stderr + run_cli(["review", "--uri", uri], check=True).stdout
    later = tmp_path / "later"
    later.mkdir()
    cat.crop((20, 10, cat.width - 30, cat.height - 20)).save(later / "cat_b.jpg", quality=70)
    run_cli(["recognize", str(later), "--keep-unknown", "--uri", uri], check=True)  # joins the cat group
    stale = run_cli(["enroll", "cat", "--from-review", cat_group["key"], "--uri", uri])
    assert stale.returncode == 2 and "changed since it was listed" in stale.stderr
    for selection, message in (("1", "not its number"), ("2" * 5000, "not its number"), ("²", "neither"), ("①", "neither"), ("g12", "neither")):
        refused = run_cli(["enroll", "cat", "--from-review", selection, "--uri", uri])
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, selection
        assert len(refused.stderr.strip().splitlines()) == 1 and len(refused.stderr) < 400, selection
    stored_id = json.loads(run_cli(["search", str(queries / "rocket.jpg"), "--uri", uri, "-k", "1", "--json"], check=True).stdout)[0]["results"][0]["id"]
    other = run_cli(["enroll", "cat", "--from-review", stored_id[:12], "--uri", uri])
    assert other.returncode == 2 and "stored image's id, not a kept query's" in other.stderr

    catalog = tmp_path / "more_catalog"
    catalog.mkdir()
    shutil.copy(queries / "rocket.jpg", catalog / "rocket.jpg")
    (tmp_path / "m.csv").write_text("path,label,sku\nrocket.jpg,,R-1\n")
    run_cli(["ingest", str(catalog), "--manifest", str(tmp_path / "m.csv"), "--uri", uri], check=True)
    rocket_id = next(m["id"] for g in json.loads(run_cli(["review", "--uri", uri, "--json"], check=True).stdout) for m in g["members"]
                     if Path(m["path"]).name == "rocket.jpg")
    enrolled = json.loads(run_cli(["enroll", "space", "--from-review", rocket_id.upper()[:10], "--uri", uri, "--json"], check=True).stdout)
    assert enrolled["ids"] == [rocket_id]
    [hit] = json.loads(run_cli(["search", str(catalog / "rocket.jpg"), "--uri", uri, "-k", "1", "--json"], check=True).stdout)[0]["results"]
    assert (hit["id"], hit["label"], hit["path"], hit["metadata"]) == (rocket_id, "space", str(catalog / "rocket.jpg"), {"sku": "R-1"})
