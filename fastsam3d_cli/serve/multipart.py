"""multipart/form-data without an extra dependency: parse a request body, build a response body.

MONAI Label's client sends its volume and `params` as multipart forms and reads results back the same way;
the standard library's MIME parser is enough for these small, trusted-size (already size-checked) bodies.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser

from fastsam3d_cli.serve.errors import ApiError


@dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


def parse_form(content_type: str, body: bytes) -> list[Part]:
    """The parts of a multipart/form-data body (400 when it is not one)."""
    if "multipart/form-data" not in (content_type or "").lower() or "boundary=" not in content_type:
        raise ApiError(400, "expected a multipart/form-data body")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "the multipart/form-data body could not be parsed")
    parts = []
    for item in message.iter_parts():
        name = item.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = item.get_payload(decode=True) or b""
        parts.append(Part(str(name), item.get_filename(), payload))
    return parts


def build_form(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data message: text fields, then files (name → (filename, data, type))."""
    boundary = f"fastsam3d-{secrets.token_hex(12)}"
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                      + value.encode() + b"\r\n")
    for name, (filename, data, media_type) in files.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: {media_type}\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)
