"""schemathesis hooks for scripts/api-fuzz: raw-byte bodies the API documents with their own
media type (a tar archive) are sent like application/octet-stream."""
import schemathesis

schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


@schemathesis.hook
def before_call(context, case, kwargs):
    """A followed timeline (`events?follow=true`) streams until its sandbox ends, which a live
    sandbox of the run does not: fuzz the endpoint without `follow` (the tests cover it)."""
    if case.operation.path == "/v1/sandboxes/{id}/events" and isinstance(case.query, dict):
        case.query.pop("follow", None)
    # A directory watch streams until its client leaves (or `timeout_ms` passes): bound it.
    if case.operation.path == "/v1/sandboxes/{id}/files/watch" and isinstance(case.query, dict):
        case.query["timeout_ms"] = "200"
