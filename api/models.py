"""Request and response bodies of the REST service."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field


class SearchHit(BaseModel):
    id: str
    score: float
    path: str
    label: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[SearchHit]


class TextQuery(BaseModel):
    text: str = Field(min_length=1, max_length=1000)
    k: int = Field(10, ge=1, le=1000)


class NeighbourOut(BaseModel):
    id: str
    label: str
    score: float
    path: str


class RecognitionOut(BaseModel):
    path: str
    label: str | None = Field(description='null: "unknown"')
    confidence: float
    threshold: float | None = Field(description="the least confidence accepted (null: none applied)")
    margin: float | None = Field(description="the least lead over the second label accepted (self-calibrated only)")
    threshold_source: str = Field(description='where they came from: "given", "eval on …", "self-calibrated on …" or "none"')
    kept_for_review: bool | None = Field(
        None, description='with keep_unknown, for an "unknown" answer: kept for GET /review (false: the review holds IMGSEARCH_REVIEW_MAX)'
    )
    neighbours: list[NeighbourOut]


class StoredImages(BaseModel):
    ids: list[str]
    label: str
    indexed: int
    updated: int
    skipped: int
    check: dict[str, Any] | None = Field(None, description="enrolment: how new references cluster, labels they are nearer to, the effect on those, warnings")
    calibration: dict[str, Any] | None = Field(None, description='the self-calibrated "unknown" threshold, when this recomputed it')
    calibration_pending: bool = Field(False, description="the threshold is still being recomputed, and applies once done (GET /info)")


class Health(BaseModel):
    status: str


class Info(BaseModel):
    collection: str
    uri: str
    exists: bool
    count: int
    model: str | None
    dim: int | None
    preprocess: str | None = None
    weights: str | None = Field(None, description='the embedding: "" the model\'s own weights, else the adapted one\'s id (`imgsearch adapt`)')
    recognition: dict[str, Any] | None = None
    self_calibration: dict[str, Any] | None = None
    supports_text: bool


class Deleted(BaseModel):
    deleted: str
    file_removed: bool = Field(description="whether the file the service stored at upload was removed too (catalog files never are)")


class DuplicateMember(BaseModel):
    id: str
    path: str
    label: str
    score: float
    grade: str
    copy_of: str | None = Field(None, description="for an identical copy: the path of the stored row it shares bytes (and id) with; not deletable on its own")
    evidence: str | None = Field(None, description="for the same picture edited: how it was made from the representative, e.g. 'mirrored, resized to 50%'")


class DuplicateGroup(BaseModel):
    representative: dict[str, str]
    members: list[DuplicateMember]


class DuplicateGroups(BaseModel):
    groups: list[DuplicateGroup]
    total: int = Field(description="groups found; `groups` holds at most `limit` of them")
    rows: int
    similar: list[DuplicateGroup] | None = Field(
        None, description="with ?similar=true: unverified look-alike groups (different pictures, maybe of one product)"
    )


class ReviewGroup(BaseModel):
    group: int = Field(description="the group's place in this listing; it changes as queries are kept")
    key: str = Field(description="what POST /review/enroll selects the group by: g + 10 hex, changed when its members change")
    members: list[dict[str, Any]] = Field(description="kept queries: id, path, confidence, nearest label, kept_at")


class ReviewEnroll(BaseModel):
    label: str = Field(min_length=1, max_length=2000)
    select: list[Annotated[str, Field(max_length=100)]] = Field(
        min_length=1, max_length=1000, description="review group keys (g + 10 hex, from GET /review) or ids (8+ hex characters)"
    )


class ReviewEnrolled(BaseModel):
    label: str
    enrolled: int
    ids: list[str]
    calibration: dict[str, Any] | None = None
    calibration_pending: bool = False
    check: dict[str, Any] | None = None
