"""A tenant's webhook URL is hostile: internal addresses are refused at creation and at every
send, after DNS resolution, however they are spelled; redirects are not followed and answers are
read only so far."""

import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from tenants.actors import Actor
from tests.processes import SERVER_POLL_S
from webhooks.models import WebhookDelivery
from webhooks.sending import Target, UnsafeAddress, post, target_resolve
from webhooks.services import WebhookError, endpoint_create, event_publish, webhooks_drain

from .receiver import Receiver

INTERNAL_URLS = [
    "http://127.0.0.1/hook",
    "http://localhost:8080/hook",  # a name that resolves to loopback
    "http://2130706433/",  # 127.0.0.1 as one number
    "http://0x7f.1/",  # hex, short form
    "http://127.1/",
    "http://0177.0.0.1/",  # octal
    "http://0.0.0.0/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/",  # 169.254.169.254, mapped
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata, link-local
    "http://10.0.0.5/",
    "http://172.16.3.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # shared address space (carrier-grade NAT)
    "http://224.0.0.1/",  # multicast
    "http://240.0.0.1/",  # reserved
    "http://[fe80::1]/",  # link-local IPv6
    "http://[fc00::1]/",  # unique local IPv6
    "http://[2002:7f00:1::]/",  # 6to4 around 127.0.0.1
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_address_is_refused_however_spelled(url):
    with pytest.raises(UnsafeAddress):
        target_resolve(url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "http://user:pw@example.com/",
        "http:///nohost",
        "http://[::1/",
        "http://does-not-exist.invalid/",
    ],
)
def test_url_that_is_no_http_address_is_refused(url):
    with pytest.raises(UnsafeAddress):
        target_resolve(url)


def test_public_address_passes_and_is_pinned(monkeypatch):
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, **kw: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))
        ],
    )
    target = target_resolve("https://hooks.example.com/in?x=1")
    assert target.address == "93.184.215.14"
    assert target.pinned_url == "https://93.184.215.14:443/in?x=1"
    assert target.host_header == "hooks.example.com"


def test_name_with_one_internal_address_among_public_ones_is_refused(monkeypatch):
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, **kw: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ],
    )
    with pytest.raises(UnsafeAddress, match=r"10\.1\.2\.3"):
        target_resolve("https://rebinding.example.com/")


@pytest.mark.django_db
def test_creating_an_endpoint_at_an_internal_address_is_a_clear_400(org, owner, client_for):
    response = client_for(owner).post(
        f"/api/v1/orgs/{org.slug}/webhooks/",
        {"url": "http://localhost:6379/", "event_types": ["job.succeeded"]},
        format="json",
    )
    assert response.status_code == 400
    assert "loopback" in response.json()["detail"]
    assert not org.webhooks_webhookendpoint_set.exists()


@pytest.mark.django_db
def test_address_is_checked_again_at_send_time(org, owner, settings, receiver):
    """Created while private addresses were open (say the name resolved elsewhere then): the send
    checks again and refuses, and the receiver gets nothing."""
    settings.WEBHOOKS_ALLOW_PRIVATE_ADDRESSES = True
    endpoint, _ = endpoint_create(
        organization=org, url=receiver.url, event_types=["job.failed"], actor=Actor(user=owner)
    )
    settings.WEBHOOKS_ALLOW_PRIVATE_ADDRESSES = False
    from django.db import transaction

    with transaction.atomic():
        event_publish(organization=org, type="job.failed", data={"job": {"id": 1}})
    assert webhooks_drain() == 0
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert delivery.state == WebhookDelivery.State.PENDING
    assert "loopback" in delivery.last_error
    assert receiver.received == []


def _target(url):
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return Target(url=url, scheme="http", host=parts.hostname, port=parts.port, address="127.0.0.1")


def test_international_name_is_resolved_and_sent_in_its_ascii_form(monkeypatch):
    asked = []

    def resolve(host, port, **kw):
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    target = target_resolve("https://bücher.example/in")
    assert asked == ["xn--bcher-kva.example"]
    assert target.host_header == "xn--bcher-kva.example"


def test_redirect_to_an_internal_address_is_not_followed():
    internal = Receiver().start()
    redirecting = Receiver(statuses=[307], location=internal.url).start()
    try:
        answer = post(target=_target(redirecting.url), body=b"{}", headers={})
        assert answer.status_code == 307 and not answer.ok
        assert "redirect" in answer.error
        assert internal.received == []
    finally:
        internal.stop()
        redirecting.stop()


def test_huge_answer_is_read_only_up_to_the_limit(settings):
    settings.WEBHOOKS_RESPONSE_MAX_BYTES = 1000
    huge = Receiver(body=b"x" * 20_000_000).start()
    try:
        answer = post(target=_target(huge.url), body=b"{}", headers={})
        assert answer.ok
        assert len(answer.body) == 1000
    finally:
        huge.stop()


def test_answer_that_drips_forever_is_cut_at_the_timeout(settings):
    settings.WEBHOOKS_TIMEOUT_S = 1.0
    stop = threading.Event()

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.end_headers()
            while not stop.is_set():  # a byte every 50 ms: never idle long enough to time out
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                stop.wait(0.05)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(SERVER_POLL_S,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        started = timezone.now()
        answer = post(target=_target(url), body=b"{}", headers={})
        assert answer.ok
        assert timezone.now() - started < timedelta(seconds=3)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_creation_refuses_a_private_address_with_the_setting_off(org, owner, db):
    with pytest.raises(WebhookError, match="private"):
        endpoint_create(
            organization=org,
            url="http://192.168.0.10/",
            event_types=["job.succeeded"],
            actor=Actor(user=owner),
        )
