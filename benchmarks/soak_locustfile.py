"""The soak's users (benchmarks/soak.py runs Locust with this file): a mixed workload on `imgsearch serve`.

Each user draws from its own random generator, seeded from SOAK_SEED and its number, so a run can be repeated. Queries
are the catalog's images (SOAK_IMAGES, one path per line); uploads and enrolments are new images drawn by the
generator, so the collection grows, and each user deletes only images it uploaded itself.

The load has three phases (`LoadWithQuietSample`): SOAK_USERS users for SOAK_WARMUP seconds, then none until soak.py
has sampled the idle service and created SOAK_RESUME_FILE, then SOAK_USERS users again until SOAK_SECONDS of load in
all. Users stop gracefully at each end (Locust's --stop-timeout): requests in flight finish.
"""

from __future__ import annotations

import io
import itertools
import os
import random
from pathlib import Path

from locust import HttpUser, LoadTestShape, between, events, task
from PIL import Image, ImageDraw

SEED = int(os.environ.get("SOAK_SEED", "0"))
IMAGES = [Path(line) for line in Path(os.environ["SOAK_IMAGES"]).read_text().splitlines() if line]
HEADERS = {"X-API-Key": os.environ["SOAK_API_KEY"]} if os.environ.get("SOAK_API_KEY") else {}
USERS = int(os.environ.get("SOAK_USERS", "16"))
WARMUP = float(os.environ.get("SOAK_WARMUP", "60"))
SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
RESUME_FILE = Path(os.environ.get("SOAK_RESUME_FILE", "soak-resume"))
FAILED_ANSWERS = Path(os.environ["SOAK_FAILED_ANSWERS"]) if os.environ.get("SOAK_FAILED_ANSWERS") else None
_numbers = itertools.count()


@events.request.add_listener
def keep_failed_answers(request_type, name, response, exception, **_) -> None:
    """What the service answered to each failed request (Locust keeps only the status): a 4xx from a server-side
    fault says which one here."""
    if exception is not None and FAILED_ANSWERS is not None and response is not None:
        with FAILED_ANSWERS.open("a") as out:
            out.write(f"{request_type} {name} {response.status_code}: {response.text[:300]!r}\n")


class LoadWithQuietSample(LoadTestShape):
    """Load, a pause for a sample of the idle service after the warm-up, load again (the module's docstring)."""

    resumed_at: float | None = None

    def tick(self) -> tuple[int, float] | None:
        now = self.get_run_time()
        if now < WARMUP:
            return USERS, USERS
        if self.resumed_at is None:
            if not RESUME_FILE.exists():
                return 0, USERS
            self.resumed_at = now
        return (USERS, USERS) if WARMUP + now - self.resumed_at < SECONDS else None


class CatalogUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.number = next(_numbers)
        self.random = random.Random(SEED * 1000 + self.number)
        self.uploaded: list[str] = []

    def query(self) -> tuple[str, bytes, str]:
        path = self.random.choice(IMAGES)
        return (path.name, path.read_bytes(), "image/png")

    def new_image(self) -> tuple[str, bytes, str]:
        """A picture no one has sent before: random shapes on a random background."""
        image = Image.new("RGB", (96, 96), tuple(self.random.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = self.random.randrange(80), self.random.randrange(80)
            draw.rectangle((x, y, x + self.random.randrange(8, 40), y + self.random.randrange(8, 40)),
                           fill=tuple(self.random.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return (f"u{self.number}.png", buffer.getvalue(), "image/png")

    @task(8)
    def search(self) -> None:
        self.client.post("/search", files={"image": self.query()}, data={"k": "10"}, headers=HEADERS, name="/search")

    @task(4)
    def recognize(self) -> None:
        keep = "true" if self.random.random() < 0.25 else "false"
        self.client.post("/recognize", files={"image": self.query()}, data={"keep_unknown": keep}, headers=HEADERS, name="/recognize")

    @task(2)
    def upload(self) -> None:
        with self.client.post("/images", files={"image": self.new_image()}, headers=HEADERS, name="/images", catch_response=True) as answer:
            if answer.ok:
                self.uploaded += answer.json()["ids"]

    @task(1)
    def enroll(self) -> None:
        label = f"soak_class_{self.random.randrange(3)}"
        with self.client.post("/enroll", files={"image": self.new_image()}, data={"label": label}, headers=HEADERS,
                              name="/enroll", catch_response=True) as answer:
            if answer.ok:
                self.uploaded += answer.json()["ids"]

    @task(1)
    def delete(self) -> None:
        if not self.uploaded:
            return self.search()
        image_id = self.uploaded.pop(self.random.randrange(len(self.uploaded)))
        self.client.delete(f"/images/{image_id}", headers=HEADERS, name="/images/{id}")

    @task(1)
    def review(self) -> None:
        self.client.get("/review", headers=HEADERS, name="/review")

    @task(1)
    def duplicates(self) -> None:
        self.client.get("/duplicates", headers=HEADERS, name="/duplicates")
