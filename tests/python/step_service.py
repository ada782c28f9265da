"""An `inventory` step service for Baton in Python, with nothing but `nats-py`, written from
docs/step-services.md (the wire contract): it is the proof that a service in any language can take
part. Workflows use it as `uses: service/inventory`.

    step_service.py NATS_URL --state FILE [--kind inventory] [--instance NAME] [--ack-wait 30]
                    [--concurrency 16] [--crash-after-effect]

Steps reserve stock: input `{"sku": str, "qty": int, "delay_ms": int}` (`delay_ms` makes the work
take that long); output `{"reservation": id, "sku": ..., "qty": ...}`. The sku `out` is out of stock
(a permanent error, code `out-of-stock`). Compensations release the reservation made by the step
they undo. Each side effect is done once per idempotency key: effects are appended to the state
file (JSON lines, fsynced) before the outcome is published, and a key seen again gets the answer it
got the first time. Every execution is recorded there too (`"op": "call"`), for the tests.

`--crash-after-effect` exits abruptly after a step's first delivery has reserved, before its outcome
is published: the request is redelivered after the ack wait, and must not reserve twice.
"""

import argparse
import asyncio
import base64
import datetime
import json
import os
import secrets
import signal
import sys
import time

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ReplayPolicy

STREAM = "BATON_RUNS"
MAX_DELIVERIES = 5
STEP_REQUESTED = "dev.baton.step.requested"
COMPENSATION_REQUESTED = "dev.baton.compensation.requested"

# Header values: space, `"`, `%` and every byte outside `!`..`~` as %XY of the UTF-8 bytes.
SAFE = frozenset(b for b in range(0x21, 0x7F) if b not in b'"%')


def pct_encode(value):
    return "".join(chr(b) if b in SAFE else "%%%02X" % b for b in value.encode("utf-8"))


def pct_decode(value):
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value, out, escaped = value[1:-1], [], False
        for c in value:
            if c == "\\" and not escaped:
                escaped = True
                continue
            out.append(c)
            escaped = False
        value = "".join(out)
    raw, i, b = bytearray(), 0, value.encode("utf-8")
    while i < len(b):
        if b[i] == ord("%"):
            hex_ = b[i + 1 : i + 3]
            if len(hex_) != 2:
                raise ValueError(f"truncated percent-escape at byte {i}")
            raw.append(int(hex_, 16))
            i += 3
        else:
            raw.append(b[i])
            i += 1
    return raw.decode("utf-8")  # strict: invalid UTF-8 is an error


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_traceparent():
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def log(*parts):
    print(now_rfc3339(), *parts, file=sys.stderr, flush=True)


class BadRequest(Exception):
    pass


class StepError(Exception):
    def __init__(self, message, retryable, code=None):
        super().__init__(message)
        self.error = {"message": message, "retryable": retryable}
        if code is not None:
            self.error["code"] = code


class Inventory:
    """The business side: reservations, once per idempotency key, kept in a JSON-lines file."""

    def __init__(self, path):
        self.path = path
        self.effects = {}  # idempotency key -> the output it got
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    entry = json.loads(line)
                    if entry["op"] in ("reserve", "release"):
                        self.effects[entry["key"]] = entry["output"]

    def record(self, entry):
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def reserve(self, key, data):
        if key in self.effects:
            return self.effects[key]
        given = data.get("input") if isinstance(data.get("input"), dict) else {}
        sku, qty = given.get("sku"), given.get("qty", 1)
        if not isinstance(sku, str) or not isinstance(qty, int) or qty < 1:
            raise StepError("`with.sku` must be a string and `with.qty` a positive integer", False, "bad-input")
        if sku == "out":
            raise StepError(f"sku {sku} is out of stock", False, "out-of-stock")
        reservation = "res-" + str(1 + sum(1 for k in self.effects if not k.endswith("/compensate")))
        output = {"reservation": reservation, "sku": sku, "qty": qty}
        self.record({"op": "reserve", "key": key, "output": output})
        self.effects[key] = output
        return output

    def release(self, key):
        if key in self.effects:
            return self.effects[key]
        undone = key[: -len("/compensate")]  # the key of the step being undone
        reserved = self.effects.get(undone)
        output = {"released": reserved["reservation"] if reserved else None}
        self.record({"op": "release", "key": key, "output": output})
        self.effects[key] = output
        return output


class Service:
    def __init__(self, args):
        self.kind = args.kind
        self.instance = args.instance or f"{args.kind}-py-{os.getpid()}"
        self.source = f"baton/{args.kind}"
        self.ack_wait = args.ack_wait
        self.concurrency = args.concurrency
        self.crash_after_effect = args.crash_after_effect
        self.inventory = Inventory(args.state)
        self.stopping = asyncio.Event()
        self.nc = None
        self.js = None

    # -- events --------------------------------------------------------------------------------

    def headers(self, ce_id, ce_type, subject, trace):
        h = {
            "ce-specversion": "1.0",
            "ce-id": pct_encode(ce_id),
            "ce-source": pct_encode(self.source),
            "ce-type": ce_type,
            "ce-subject": pct_encode(subject),
            "ce-time": now_rfc3339(),
            "ce-datacontenttype": "application/json",
            "ce-traceparent": pct_encode(trace["traceparent"]),
            "Nats-Msg-Id": ce_id,
        }
        if "tracestate" in trace:
            h["ce-tracestate"] = pct_encode(trace["tracestate"])
        return h

    async def announce(self, req, verb, delivered, started):
        """`step.started` or `step.heartbeat`: informational, so a failure is only logged."""
        d, comp = req["data"], req["compensation"]
        elapsed = int((time.monotonic() - started) * 1000)
        ce_id = f"{d['run_id']}.{d['step']}{req['label']}.{'c' if comp else ''}{d['attempt']}.{verb}.{delivered}.{elapsed}"
        data = {"run_id": d["run_id"], "step": d["step"], "kind": d["kind"], "attempt": d["attempt"],
                "runner": self.instance, "delivered": delivered, "elapsed_ms": elapsed}
        if d.get("item") is not None:
            data["item"] = d["item"]
        if comp:
            data["compensation"] = True
        ce_type = "dev.baton.step.started" if verb == "started" else "dev.baton.step.heartbeat"
        headers = self.headers(ce_id, ce_type, f"{d['run_id']}/{d['step']}", req["trace"])
        if verb == "heartbeat":
            headers["Nats-TTL"] = "24h"
        try:
            await self.nc.publish(f"{req['prefix']}.{verb}", json.dumps(data).encode(), headers=headers)
        except Exception as e:  # noqa: BLE001
            log("cannot publish", verb, e)

    def outcome(self, req, result, duration_ms):
        """(subject, headers, body) of the attempt's outcome: completed or failed, one id for both."""
        d, comp = req["data"], req["compensation"]
        ok = "output" in result
        if comp:
            ce_id = f"{d['run_id']}.{d['step']}.c{d['attempt']}.outcome"
            verb, ce_type = ("compensated", "dev.baton.compensation.completed") if ok else \
                ("compensation-failed", "dev.baton.compensation.failed")
        else:
            ce_id = f"{d['run_id']}.{d['step']}{req['label']}.{d['attempt']}.outcome"
            verb, ce_type = ("completed", "dev.baton.step.completed") if ok else ("failed", "dev.baton.step.failed")
        data = {"run_id": d["run_id"], "step": d["step"], "kind": d["kind"], "attempt": d["attempt"]}
        if d.get("item") is not None:
            data["item"] = d["item"]
        if ok:
            data.update(output=result["output"], runner=self.instance, duration_ms=duration_ms)
        else:
            data.update(error=result["error"], runner=self.instance)
        headers = self.headers(ce_id, ce_type, f"{d['run_id']}/{d['step']}", req["trace"])
        return f"{req['prefix']}.{verb}", headers, json.dumps(data).encode()

    # -- requests ------------------------------------------------------------------------------

    def decode(self, msg):
        headers = {k.lower(): v for k, v in (msg.headers or {}).items()}
        if "ce-specversion" not in headers:
            raise BadRequest("no ce-specversion header: not a binary-mode CloudEvent")
        try:
            attrs = {k[3:]: pct_decode(v) for k, v in headers.items() if k.startswith("ce-")}
        except ValueError as e:
            raise BadRequest(f"a ce-* header does not percent-decode: {e}") from e
        if attrs["specversion"] != "1.0":
            raise BadRequest(f"specversion {attrs['specversion']!r} is not supported")
        for name in ("id", "source", "type"):
            if not attrs.get(name):
                raise BadRequest(f"required attribute `{name}` is missing or empty")
        verb = msg.subject.rsplit(".", 1)[1]
        expected = {"requested": STEP_REQUESTED, "compensate": COMPENSATION_REQUESTED}.get(verb)
        if attrs["type"] != expected:
            raise BadRequest(f"expected a step or compensation request, got {attrs['type']}")
        try:
            data = json.loads(msg.data)
        except ValueError as e:
            raise BadRequest(f"data of {attrs['type']} event {attrs['id']!r} is not JSON: {e}") from e
        for field, ty in (("run_id", str), ("step", str), ("kind", str), ("attempt", int),
                          ("idempotency_key", str)):
            if not isinstance(data.get(field), ty):
                raise BadRequest(f"data of {attrs['type']} event {attrs['id']!r} is invalid: `{field}`")
        trace = {"traceparent": attrs.get("traceparent") or new_traceparent()}
        if attrs.get("traceparent") and attrs.get("tracestate"):
            trace["tracestate"] = attrs["tracestate"]
        item = data.get("item")
        return {
            "data": data,
            "compensation": verb == "compensate",
            "trace": trace,
            "label": f"[{item}]" if item is not None else "",
            "prefix": msg.subject.rsplit(".", 1)[0],
        }

    async def dead_letter(self, msg, reason):
        """Stores what cannot be a request in BATON_DLQ, then terminates it (docs/events.md)."""
        log("rejecting", msg.subject, reason)
        md = msg.metadata
        ce_id = f"{md.stream}.{md.sequence.stream}"
        letter = {"reason": reason, "origin": self.kind, "subject": msg.subject,
                  "headers": {k: [v] for k, v in (msg.headers or {}).items()},
                  "payload_base64": base64.b64encode(msg.data).decode()}
        headers = self.headers(ce_id, "dev.baton.deadletter", msg.subject, {"traceparent": new_traceparent()})
        try:
            await self.js.publish(f"baton.dlq.{self.kind}", json.dumps(letter).encode(), headers=headers)
            await msg.term()
        except Exception as e:  # noqa: BLE001
            log("cannot store a dead letter; the request will be redelivered:", e)
            await msg.nak(delay=1)

    def work(self, req, delivered):
        d = req["data"]
        key = d["idempotency_key"]
        self.inventory.record({"op": "call", "key": key, "attempt": d["attempt"], "delivered": delivered,
                               "compensation": req["compensation"]})
        if req["compensation"]:
            return self.inventory.release(key)
        output = self.inventory.reserve(key, d)
        if self.crash_after_effect and delivered == 1:
            log("crashing after the effect of", key, "before its outcome is stored")
            os._exit(3)
        return output

    async def execute(self, msg, req, delivered, started):
        """Runs the work with progress acks and heartbeats every third of the ack wait, and the
        step's timeout. None when shutting down (no outcome, no ack)."""
        d = req["data"]

        async def run():
            delay = d["input"].get("delay_ms", 0) if isinstance(d.get("input"), dict) else 0
            if delay:
                await asyncio.sleep(delay / 1000)
            return self.work(req, delivered)

        task = asyncio.ensure_future(run())
        stop = asyncio.ensure_future(self.stopping.wait())
        deadline = started + d["timeout_ms"] / 1000 if d.get("timeout_ms") else None
        try:
            while True:
                tick = self.ack_wait / 3
                if deadline is not None:
                    tick = max(0.0, min(tick, deadline - time.monotonic()))
                done, _ = await asyncio.wait({task, stop}, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    try:
                        return {"output": task.result()}
                    except StepError as e:
                        return {"error": e.error}
                    except Exception as e:  # noqa: BLE001
                        return {"error": {"message": f"{type(e).__name__}: {e}", "retryable": True}}
                if stop in done:
                    return None
                if deadline is not None and time.monotonic() >= deadline:
                    return {"error": {"message": f"timed out after {d['timeout_ms']}ms", "retryable": True,
                                      "code": "timeout"}}
                await msg.in_progress()
                await self.announce(req, "heartbeat", delivered, started)
        finally:
            for t in (task, stop):
                if not t.done():
                    t.cancel()

    async def handle(self, msg):
        try:
            req = self.decode(msg)
        except BadRequest as e:
            await self.dead_letter(msg, str(e))
            return
        delivered = msg.metadata.num_delivered
        started = time.monotonic()
        if delivered > MAX_DELIVERIES:
            result = {"error": {
                "message": f"the request was delivered {delivered} times without an outcome; runners kept dying or failing",
                "retryable": False, "code": "runner-lost"}}
        else:
            await self.announce(req, "started", delivered, started)
            result = await self.execute(msg, req, delivered, started)
            if result is None:
                return  # shutting down: left un-acked, another instance executes it
        duration_ms = int((time.monotonic() - started) * 1000)
        subject, headers, body = self.outcome(req, result, duration_ms)
        size = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if size > self.nc.max_payload:
            result = {"error": {
                "message": f"the step's output is {size} bytes, more than the {self.nc.max_payload} bytes a message "
                           "may have (the server's max_payload): output a reference to large data, not the data",
                "retryable": False, "code": "output-too-large"}}
            subject, headers, body = self.outcome(req, result, duration_ms)
        pause = 0.1
        while True:
            try:
                ack = await self.js.publish(subject, body, headers=headers, timeout=5)
                break
            except Exception as e:  # noqa: BLE001
                if self.stopping.is_set():
                    return
                log("cannot store the outcome yet; retrying:", e)
                await msg.in_progress()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2)
        # Acked only now that JetStream stored the outcome (or had it already: ack.duplicate).
        await msg.ack()
        log("stored", headers["ce-type"], headers["Nats-Msg-Id"], "(duplicate)" if ack.duplicate else "")

    # -- main loop -----------------------------------------------------------------------------

    async def run(self, url):
        self.nc = await nats.connect(url, name=self.instance, max_reconnect_attempts=-1)
        self.js = self.nc.jetstream()
        while True:  # Baton's services create the stream.
            try:
                await self.js.stream_info(STREAM)
                break
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.5)
        name = f"runner-{self.kind}"
        await self.js.add_consumer(STREAM, ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subjects=[f"baton.run.*.*.step.{self.kind}.requested",
                             f"baton.run.*.*.step.{self.kind}.compensate"],
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=-1,
            max_ack_pending=10000,
            replay_policy=ReplayPolicy.INSTANT,
        ))
        sub = await self.js.pull_subscribe_bind(durable=name, stream=STREAM)
        log("serving", self.kind, "as", self.instance)
        running = set()
        while not self.stopping.is_set():
            free = self.concurrency - len(running)
            if free <= 0:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                messages = await sub.fetch(free, timeout=1)
            except nats.errors.TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001
                log("pull error; retrying:", e)
                await asyncio.sleep(0.5)
                continue
            for m in messages:
                t = asyncio.ensure_future(self.handle(m))
                running.add(t)
                t.add_done_callback(running.discard)
        log("shutting down")
        if running:
            await asyncio.wait(running, timeout=5)
        await self.nc.drain()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--state", required=True)
    p.add_argument("--kind", default="inventory")
    p.add_argument("--instance")
    p.add_argument("--ack-wait", type=float, default=30)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--crash-after-effect", action="store_true")
    args = p.parse_args()

    async def serve():
        service = Service(args)
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, service.stopping.set)
        await service.run(args.url)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
