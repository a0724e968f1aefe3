"""A fake Stripe API over real HTTP, for the endpoints billing.stripe_gateway uses.

It parses the stripe library's form encoding (`payload[value]`, `items[0][price]`), checks the
method, path, required parameters and bearer key, replays a stored answer for a repeated
Idempotency-Key (and refuses the key with other parameters), keeps meter-event identifiers
unique, records every meter event, and can fail or stall the next requests. It also builds
invoices from the meter events it received and signs webhook payloads as Stripe does.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from tests.processes import SERVER_POLL_S


class StripeFault(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code=""):
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code

    def body(self) -> dict:
        error = {"type": self.type, "message": str(self)}
        if self.code:
            error["code"] = self.code
        return {"error": error}


def parse_form(text: str) -> dict:
    """Stripe's form encoding to nested dicts and lists."""
    root: dict = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        parts = re.findall(r"[^\[\]]+", key)
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node):
    if isinstance(node, dict):
        node = {key: _lists(value) for key, value in node.items()}
        if node and all(key.isdigit() for key in node):
            return [node[key] for key in sorted(node, key=int)]
    return node


@dataclass
class Fault:
    kind: str  # "fail" or "stall"
    remaining: int
    status: int = 500
    seconds: float = 0.0
    after_processing: bool = False  # stall only: do the work, then keep the answer back
    request: tuple[str, str] | None = None  # only this (method, path); None: any request


@dataclass
class FakeStripe:
    api_key: str = "sk_test_fake"
    webhook_secret: str = "whsec_fake"
    objects: dict[str, dict[str, dict]] = field(default_factory=lambda: defaultdict(dict))
    meter_events: list[dict] = field(default_factory=list)
    identifiers: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    idempotent: dict[str, tuple[str, int, dict]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    released: threading.Event = field(default_factory=threading.Event)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    # Ids differ between servers, as a database outliving one fake must not meet its ids again.
    instance: str = field(default_factory=lambda: secrets.token_hex(3))

    # Test controls

    def fail_next(
        self, count: int, *, status: int = 500, request: tuple[str, str] | None = None
    ) -> None:
        with self.lock:
            self.faults.append(Fault("fail", count, status=status, request=request))

    def stall_next(self, count: int, *, seconds: float, after_processing: bool = False) -> None:
        with self.lock:
            self.faults.append(
                Fault("stall", count, seconds=seconds, after_processing=after_processing)
            )

    def faults_left(self) -> int:
        with self.lock:
            return sum(fault.remaining for fault in self.faults)

    def meter_total(self, *, customer: str | None = None, event_name: str | None = None) -> int:
        with self.lock:
            return sum(
                int(event["payload"]["value"])
                for event in self.meter_events
                if (customer is None or event["payload"]["stripe_customer_id"] == customer)
                and (event_name is None or event["event_name"] == event_name)
            )

    def _id(self, prefix: str) -> str:
        return f"{prefix}_fake{self.instance}{next(self.counter):06d}"

    # HTTP

    def handle(self, method: str, path: str, query: str, body: str, headers) -> tuple[int, dict]:
        with self.lock:
            self.requests.append((method, path))
            fault = next(
                (f for f in self.faults if f.remaining > 0 and f.request in (None, (method, path))),
                None,
            )
            if fault is not None:
                fault.remaining -= 1
        if fault is not None and fault.kind == "fail":
            return fault.status, StripeFault(
                fault.status, "Injected failure", type_="api_error"
            ).body()
        if fault is not None and not fault.after_processing:
            self.released.wait(fault.seconds)
            return 500, StripeFault(500, "Stalled", type_="api_error").body()
        status, answer = self._answer(method, path, query, body, headers)
        if fault is not None:
            self.released.wait(fault.seconds)
        return status, answer

    def _answer(self, method, path, query, body, headers) -> tuple[int, dict]:
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, StripeFault(401, "Invalid API Key provided.").body()
        params = parse_form(query if method == "GET" else body)
        key = headers.get("Idempotency-Key") if method == "POST" else None
        fingerprint = f"{path}?{json.dumps(params, sort_keys=True)}"
        with self.lock:
            if key is not None and key in self.idempotent:
                stored_fingerprint, status, answer = self.idempotent[key]
                if stored_fingerprint != fingerprint:
                    return 400, StripeFault(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters.",
                        type_="idempotency_error",
                    ).body()
                return status, answer
            try:
                status, answer = 200, self._route(method, path, params)
            except StripeFault as fault:
                status, answer = fault.status, fault.body()
            if key is not None:
                self.idempotent[key] = (fingerprint, status, answer)
        return status, answer

    def _route(self, method: str, path: str, params: dict) -> dict:
        routes = [
            ("POST", r"/v1/customers", self._customer_create),
            ("POST", r"/v1/customers/(?P<id>[^/]+)/balance_transactions", self._balance_create),
            ("POST", r"/v1/customers/(?P<id>cus_[^/]+)", self._customer_update),
            ("GET", r"/v1/setup_intents/(?P<id>[^/]+)", self._setup_intent_get),
            ("POST", r"/v1/products", self._product_create),
            ("POST", r"/v1/prices", self._price_create),
            ("POST", r"/v1/billing/meters", self._meter_create),
            ("GET", r"/v1/billing/meters/(?P<id>[^/]+)/event_summaries", self._summaries),
            ("POST", r"/v1/billing/meter_events", self._meter_event_create),
            ("POST", r"/v1/subscriptions", self._subscription_create),
            ("GET", r"/v1/subscriptions", self._subscription_list),
            ("POST", r"/v1/subscriptions/(?P<id>sub_[^/]+)", self._subscription_update),
            ("POST", r"/v1/subscription_items", self._subscription_item_create),
            ("GET", r"/v1/subscription_items", self._subscription_item_list),
            ("POST", r"/v1/checkout/sessions", self._checkout_create),
            ("POST", r"/v1/billing_portal/sessions", self._portal_create),
        ]
        known_path = False
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                known_path = True
                if route_method == method:
                    return handler(params, **match.groupdict())
        if known_path:
            raise StripeFault(405, f"{method} is not allowed on {path}")
        raise StripeFault(404, f"Unrecognized request URL ({method}: {path}).")

    # Endpoints

    @staticmethod
    def _require(params: dict, *names: str) -> None:
        for name in names:
            node = params
            for part in name.split("."):
                if not isinstance(node, dict) or part not in node or node[part] in ("", None):
                    raise StripeFault(
                        400, f"Missing required param: {name}.", code="parameter_missing"
                    )
                node = node[part]

    def _get(self, kind: str, object_id: str) -> dict:
        found = self.objects[kind].get(object_id)
        if found is None:
            raise StripeFault(400, f"No such {kind}: '{object_id}'", code="resource_missing")
        return found

    def _customer_create(self, params):
        customer = {
            "id": self._id("cus"),
            "object": "customer",
            "name": params.get("name"),
            "email": params.get("email"),
            "metadata": params.get("metadata", {}),
            "balance": 0,
        }
        self.objects["customer"][customer["id"]] = customer
        return customer

    def _customer_update(self, params, id):
        customer = self._get("customer", id)
        default = (params.get("invoice_settings") or {}).get("default_payment_method")
        if default is not None:
            if default not in self.objects["payment_method"]:
                raise StripeFault(
                    400, f"No such PaymentMethod: '{default}'", code="resource_missing"
                )
            customer["invoice_settings"] = {"default_payment_method": default}
        return customer

    def _setup_intent_get(self, params, id):
        return self._get("setup_intent", id)

    def _balance_create(self, params, id):
        self._require(params, "amount", "currency")
        customer = self._get("customer", id)
        customer["balance"] += int(params["amount"])
        entry = {
            "id": self._id("cbtxn"),
            "object": "customer_balance_transaction",
            "amount": int(params["amount"]),
            "currency": params["currency"],
            "customer": id,
            "description": params.get("description"),
            "ending_balance": customer["balance"],
            "metadata": params.get("metadata", {}),
            "type": "adjustment",
        }
        self.objects["balance_transaction"][entry["id"]] = entry
        return entry

    def _product_create(self, params):
        self._require(params, "name")
        product = {"id": self._id("prod"), "object": "product", "name": params["name"]}
        product["metadata"] = params.get("metadata", {})
        self.objects["product"][product["id"]] = product
        return product

    def _price_create(self, params):
        self._require(params, "currency", "product", "unit_amount")
        self._get("product", params["product"])
        recurring = params.get("recurring")
        if recurring is not None:
            self._require(params, "recurring.interval")
            if recurring.get("usage_type") == "metered":
                self._require(params, "recurring.meter")
                self._get("meter", recurring["meter"])
        price = {
            "id": self._id("price"),
            "object": "price",
            "currency": params["currency"],
            "product": params["product"],
            "unit_amount": int(params["unit_amount"]),
            "recurring": recurring,
            "metadata": params.get("metadata", {}),
        }
        self.objects["price"][price["id"]] = price
        return price

    def _meter_create(self, params):
        self._require(params, "display_name", "event_name", "default_aggregation.formula")
        if any(m["event_name"] == params["event_name"] for m in self.objects["meter"].values()):
            raise StripeFault(400, "An active meter with this event_name already exists.")
        meter = {
            "id": self._id("mtr"),
            "object": "billing.meter",
            "display_name": params["display_name"],
            "event_name": params["event_name"],
            "default_aggregation": params["default_aggregation"],
            "customer_mapping": params.get(
                "customer_mapping", {"type": "by_id", "event_payload_key": "stripe_customer_id"}
            ),
            "value_settings": params.get("value_settings", {"event_payload_key": "value"}),
            "status": "active",
        }
        self.objects["meter"][meter["id"]] = meter
        return meter

    def _meter_event_create(self, params):
        self._require(params, "event_name", "payload.stripe_customer_id", "payload.value")
        identifier = params.get("identifier") or self._id("mev")
        if identifier in self.identifiers:
            raise StripeFault(
                400,
                f"An event already exists with identifier {identifier}.",
                code="resource_already_exists",
            )
        self._get("customer", params["payload"]["stripe_customer_id"])
        if not any(m["event_name"] == params["event_name"] for m in self.objects["meter"].values()):
            raise StripeFault(400, f"No active meter for event_name {params['event_name']}.")
        if not re.fullmatch(r"-?\d+(\.\d+)?", params["payload"]["value"]):
            raise StripeFault(400, "payload[value] must be a number.")
        event = {
            "object": "billing.meter_event",
            "created": int(time.time()),
            "event_name": params["event_name"],
            "identifier": identifier,
            "livemode": False,
            "payload": params["payload"],
            "timestamp": int(params.get("timestamp") or time.time()),
        }
        self.meter_events.append(event)
        self.identifiers.add(identifier)
        return event

    def _summaries(self, params, id):
        self._require(params, "customer", "start_time", "end_time")
        meter = self._get("meter", id)
        start, end = int(params["start_time"]), int(params["end_time"])
        if start % 60 or end % 60:
            raise StripeFault(400, "start_time and end_time must be aligned with minutes.")
        value = sum(
            float(e["payload"]["value"])
            for e in self.meter_events
            if e["event_name"] == meter["event_name"]
            and e["payload"]["stripe_customer_id"] == params["customer"]
            and start <= e["timestamp"] < end
        )
        summary = {
            "id": self._id("mtrsum"),
            "object": "billing.meter_event_summary",
            "aggregated_value": value,
            "start_time": start,
            "end_time": end,
            "meter": id,
            "livemode": False,
        }
        url = f"/v1/billing/meters/{id}/event_summaries"
        return {"object": "list", "data": [summary], "has_more": False, "url": url}

    def _item(self, subscription_id: str, entry: dict, *, taken=()) -> dict:
        price = self._get("price", entry.get("price", ""))
        if price["id"] in taken:
            raise StripeFault(
                400, f"The price {price['id']} is already on subscription {subscription_id}."
            )
        item = {
            "id": self._id("si"),
            "object": "subscription_item",
            "price": price,
            "subscription": subscription_id,
        }
        if price["recurring"] and price["recurring"].get("usage_type") != "metered":
            item["quantity"] = int(entry.get("quantity", 1))
        self.objects["subscription_item"][item["id"]] = item
        return item

    @staticmethod
    def _proration(params) -> str | None:
        behavior = params.get("proration_behavior")
        if behavior not in (None, "always_invoice", "create_prorations", "none"):
            raise StripeFault(400, f"Invalid proration_behavior: {behavior}")
        return behavior

    def _subscription_create(self, params):
        self._require(params, "customer", "items")
        self._get("customer", params["customer"])
        anchor = params.get("billing_cycle_anchor")
        if anchor is not None and (not anchor.isdigit() or int(anchor) <= time.time()):
            raise StripeFault(400, "billing_cycle_anchor must be a timestamp in the future.")
        subscription_id = self._id("sub")
        items = []
        for entry in params["items"]:
            taken = {item["price"]["id"] for item in items}
            items.append(self._item(subscription_id, entry, taken=taken))
        subscription = {
            "id": subscription_id,
            "object": "subscription",
            "customer": params["customer"],
            "status": "active",
            "billing_cycle_anchor": int(anchor) if anchor is not None else int(time.time()),
            "proration_behavior": self._proration(params),
            "items": {"object": "list", "data": items, "has_more": False},
            "metadata": params.get("metadata", {}),
        }
        self.objects["subscription"][subscription_id] = subscription
        return subscription

    def _subscription_list(self, params):
        found = [
            subscription
            for subscription in self.objects["subscription"].values()
            if params.get("customer") in (None, subscription["customer"])
            and subscription["status"] != "canceled"
        ]
        return {"object": "list", "data": found, "has_more": False, "url": "/v1/subscriptions"}

    def _subscription_update(self, params, id):
        subscription = self._get("subscription", id)
        self._proration(params)
        items = subscription["items"]["data"]
        for entry in params.get("items") or []:
            if entry.get("deleted") == "true":
                if not any(item["id"] == entry.get("id") for item in items):
                    raise StripeFault(400, f"No such subscription item: '{entry.get('id')}'")
                items[:] = [item for item in items if item["id"] != entry["id"]]
                del self.objects["subscription_item"][entry["id"]]
            elif entry.get("id"):
                raise StripeFault(400, "The fake changes items only by deleting and adding them.")
            else:
                items.append(self._item(id, entry, taken={item["price"]["id"] for item in items}))
        if "metadata" in params:
            subscription["metadata"].update(params["metadata"])
        return subscription

    def _subscription_item_create(self, params):
        self._require(params, "subscription", "price")
        subscription = self._get("subscription", params["subscription"])
        taken = {item["price"]["id"] for item in subscription["items"]["data"]}
        item = self._item(subscription["id"], params, taken=taken)
        subscription["items"]["data"].append(item)
        return item

    def _subscription_item_list(self, params):
        self._require(params, "subscription")
        subscription = self._get("subscription", params["subscription"])
        url = "/v1/subscription_items"
        return {
            "object": "list",
            "data": subscription["items"]["data"],
            "has_more": False,
            "url": url,
        }

    def _checkout_create(self, params):
        self._require(params, "mode", "success_url")
        if params["mode"] == "setup" and not (
            params.get("currency") or params.get("payment_method_types")
        ):
            raise StripeFault(400, "currency or payment_method_types is required in setup mode.")
        if params.get("customer"):
            self._get("customer", params["customer"])
        session_id = self._id("cs_test")
        intent = None
        if params["mode"] == "setup":
            intent = self._id("seti")
            self.objects["setup_intent"][intent] = {
                "id": intent,
                "object": "setup_intent",
                "customer": params.get("customer"),
                "payment_method": None,
                "status": "requires_payment_method",
            }
        session = self.objects["checkout_session"][session_id] = {
            "setup_intent": intent,
            "status": "open",
            "id": session_id,
            "object": "checkout.session",
            "mode": params["mode"],
            "customer": params.get("customer"),
            "success_url": params["success_url"],
            "cancel_url": params.get("cancel_url"),
            "url": f"https://checkout.stripe.test/c/setup/{session_id}",
        }
        return session

    def _portal_create(self, params):
        self._require(params, "customer")
        self._get("customer", params["customer"])
        session_id = self._id("bps")
        return {
            "id": session_id,
            "object": "billing_portal.session",
            "customer": params["customer"],
            "return_url": params.get("return_url"),
            "url": f"https://billing.stripe.test/p/session/{session_id}",
        }

    def checkout_complete(self, session_id: str) -> dict:
        """The customer saved a card on the Checkout page: the completed session."""
        with self.lock:
            session = self.objects["checkout_session"][session_id]
            method = self._id("pm")
            self.objects["payment_method"][method] = {"id": method, "object": "payment_method"}
            intent = self.objects["setup_intent"][session["setup_intent"]]
            intent.update(payment_method=method, status="succeeded")
            session["status"] = "complete"
            return dict(session)

    # Invoices and webhooks

    def invoice(
        self,
        *,
        customer: str,
        invoice_id: str = "in_fake1",
        status: str = "draft",
        number: str = "",
        period_start: int = 0,
        period_end: int | None = None,
        paid_at: int | None = None,
    ) -> dict:
        """The customer's invoice built from the meter events received (1 minor unit each)."""
        period_end = period_end if period_end is not None else int(time.time()) + 1
        by_meter: dict[str, int] = defaultdict(int)
        with self.lock:
            for event in self.meter_events:
                if (
                    event["payload"]["stripe_customer_id"] == customer
                    and period_start <= event["timestamp"] < period_end
                ):
                    by_meter[event["event_name"]] += int(event["payload"]["value"])
            prices = {
                meter["event_name"]: price
                for price in self.objects["price"].values()
                for meter in self.objects["meter"].values()
                if (price["recurring"] or {}).get("meter") == meter["id"]
            }
            balance = -self.objects["customer"].get(customer, {"balance": 0})["balance"]
        lines = [
            {
                "id": f"il_{invoice_id}_{n}",
                "object": "line_item",
                "amount": amount,
                "currency": "usd",
                "description": f"{amount} x {name}",
                "quantity": amount,
                "period": {"start": period_start, "end": period_end},
                "pricing": {
                    "type": "price_details",
                    "price_details": {"price": prices[name]["id"]},
                },
            }
            for n, (name, amount) in enumerate(sorted(by_meter.items()))
        ]
        subtotal = sum(line["amount"] for line in lines)
        applied = min(balance, subtotal) if status != "draft" else 0
        return {
            "id": invoice_id,
            "object": "invoice",
            "customer": customer,
            "status": status,
            "number": number or None,
            "currency": "usd",
            "subtotal": subtotal,
            "total": subtotal,
            "total_discount_amounts": [],
            "total_taxes": [],
            "amount_due": subtotal - applied,
            "amount_paid": subtotal - applied if status == "paid" else 0,
            "period_start": period_start,
            "period_end": period_end,
            "hosted_invoice_url": f"https://invoice.stripe.test/i/{invoice_id}" if number else None,
            "invoice_pdf": f"https://pay.stripe.test/invoice/{invoice_id}/pdf" if number else None,
            "status_transitions": {
                "finalized_at": period_end if status != "draft" else None,
                "paid_at": paid_at,
            },
            "lines": {"object": "list", "data": lines, "has_more": False},
        }

    def event(self, type_: str, obj: dict, *, created: int, event_id: str | None = None) -> dict:
        return {
            "id": event_id or self._id("evt"),
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": created,
            "type": type_,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "data": {"object": obj},
        }

    def sign(self, body: bytes, *, timestamp: int | None = None, secret: str | None = None) -> str:
        timestamp = int(time.time()) if timestamp is None else timestamp
        signed = f"{timestamp}.".encode() + body
        key = (secret or self.webhook_secret).encode()
        return f"t={timestamp},v1={hmac.new(key, signed, hashlib.sha256).hexdigest()}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed ACK
    server: _Server

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        status, answer = self.server.fake.handle(
            method, parts.path, parts.query, body, self.headers
        )
        data = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Request-Id", f"req_{time.monotonic_ns()}")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a stalled answer)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")

    def log_message(self, format, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeStripe


class StripeServer:
    """The fake on 127.0.0.1 and a free port, served from a thread until `stop()`."""

    def __init__(self, fake: FakeStripe | None = None):
        self.fake = fake or FakeStripe()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self.fake
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(SERVER_POLL_S,), daemon=True
        )

    def start(self) -> StripeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.fake.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
