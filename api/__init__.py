"""The FastAPI service over the core functions in `imgsearch` (search, recognition, enrolment).

Not built yet: the REST service is tracked in its own issue. Nothing here is imported by the CLI.
"""
