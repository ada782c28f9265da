"""CloudEvents on NATS, the other side: the Python SDK (`cloudevents` 2.x) and `nats-py`.

Python's SDK has no NATS binding, so this maps its HTTP binding to the NATS one as the spec says:
same percent-encoded `ce-*` headers, except that `datacontenttype` travels as `ce-datacontenttype`
instead of `Content-Type`. Used by Baton's interop tests:

    cloudevents_nats.py publish URL SUBJECT binary|structured ID
    cloudevents_nats.py read URL STREAM FILTER_SUBJECT
"""

import asyncio
import json
import sys
from urllib.parse import quote, unquote

import nats
from cloudevents.core.bindings import http
from cloudevents.core.bindings.http import HTTPMessage
from cloudevents.core.v1.event import CloudEvent


def to_nats(event, mode):
    """An SDK event as NATS headers and body."""
    message = http.to_binary_event(event) if mode == "binary" else http.to_structured_event(event)
    headers = {}
    for name, value in message.headers.items():
        if mode == "binary" and name.lower() == "content-type":
            headers["ce-datacontenttype"] = quote(value, safe="".join(c for c in map(chr, range(0x21, 0x7F)) if c not in ' "%'))
        else:
            headers[name] = value
    return headers, message.body


def from_nats(headers, body):
    """A NATS message (binary or structured) as an SDK event."""
    mapped = {}
    for name, value in (headers or {}).items():
        lower = name.lower()
        if lower == "ce-datacontenttype":
            mapped["content-type"] = unquote(value)
        elif lower.startswith("ce-") or lower == "content-type":
            mapped[lower] = value
    return http.from_http_event(HTTPMessage(headers=mapped, body=body))


async def publish(url, subject, mode, event_id):
    event = CloudEvent(
        attributes={
            "type": "com.example.python.greeting",
            "source": "/python/sdk",
            "id": event_id,
            "subject": "Grüße 😀",
            "datacontenttype": "application/json",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        data={"greeting": "héllo from python", "n": 3},
    )
    headers, body = to_nats(event, mode)
    nc = await nats.connect(url)
    ack = await nc.jetstream().publish(subject, body, headers=headers)
    await nc.close()
    print(json.dumps({"stream": ack.stream, "seq": ack.seq}))


async def read(url, stream, filter_subject):
    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe(filter_subject, stream=stream)
    messages = await sub.fetch(100, timeout=5)
    out = []
    for m in messages:
        event = from_nats(m.headers, m.data)
        attributes = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in event.get_attributes().items()}
        data = event.get_data()
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        out.append({"attributes": attributes, "data": data})
    await nc.close()
    print(json.dumps(out))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    asyncio.run(publish(*args) if command == "publish" else read(*args))
