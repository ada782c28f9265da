#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets, in corpus/<target>/, from the repository's fixtures.

Input layout (src/lib.rs): one byte, the number of header lines; the lines, `name: value\\n`; the body.
"""
import glob
import hashlib
import hmac
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "../../../tests/fixtures")
SECRET = b"It's a Secret to Everybody"  # the fuzz target's secret


def framed(headers, body):
    lines = b"".join(f"{n}: {v}\n".encode() for n, v in headers)
    return bytes([len(headers)]) + lines + body


def write(target, name, data):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


binary = [
    ("ce-specversion", "1.0"),
    ("ce-id", "1"),
    ("ce-source", "/s"),
    ("ce-type", "com.example.t"),
    ("ce-time", "2024-01-01T00:00:00Z"),
    ("ce-subject", "Euro%20%E2%82%AC"),
    ("ce-ext", '"quoted \\"string\\""'),
    ("content-type", "application/json"),
]
write("cloudevents_http", "binary", framed(binary, b'{"a": 1}'))
write("cloudevents_nats", "binary", framed(binary, b'{"a": 1}'))
vectors = sorted(glob.glob(f"{FIXTURES}/cloudevents/sdk-test-vectors/sdk-java-json/*/*.json"))
for path in vectors:
    name = os.path.relpath(path, f"{FIXTURES}/cloudevents/sdk-test-vectors").replace("/", "_")
    body = read(path)
    write("cloudevents_http", name, framed([("content-type", "application/cloudevents+json")], body))
    write("cloudevents_nats", name, framed([], body))
batch = b"[" + b",".join(read(p) for p in vectors[:3]) + b"]"
write("cloudevents_http", "batch", framed([("content-type", "application/cloudevents-batch+json")], batch))

for path in sorted(glob.glob(f"{FIXTURES}/github/payloads/*.json")):
    body = read(path)
    event = os.path.basename(path).split("__")[0]
    signature = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    headers = [
        ("x-github-event", event),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ("x-hub-signature-256", signature),
        ("content-type", "application/json"),
    ]
    write("github", os.path.basename(path), framed(headers, body))

for path in sorted(glob.glob(f"{FIXTURES}/alertmanager/webhooks/*.body.json")):
    write("alertmanager", os.path.basename(path), read(path))
