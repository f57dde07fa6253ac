"""schemathesis hooks for scripts/api-fuzz: raw-byte bodies the API documents with their own
media type (a tar archive) are sent like application/octet-stream."""
import schemathesis

schemathesis.serializer.alias("application/x-tar", "application/octet-stream")
