"""The header: the organization's administration pages sit under one Settings menu, so the
top-level links fit one line at laptop widths."""

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_settings_like_pages_are_under_one_menu_not_top_level_links(org, member_factory, client):
    client.force_login(member_factory(org, "owner"))
    html = client.get(reverse("tenants:overview", args=[org.slug])).content.decode()
    header = html[html.index("<header") : html.index("</header>")]
    start = header.index('<details class="dropdown" id="settings-menu">')
    end = header.index("</details>", start)
    menu, rest = header[start:end], header[:start] + header[end:]
    assert "<summary>Settings</summary>" in menu
    for name in ("members", "api_keys", "audit", "settings"):
        href = f'href="{reverse(f"tenants:{name}", args=[org.slug])}"'
        assert href in menu and href not in rest, name
    # The pages people work in stay one click away.
    assert f'href="{reverse("jobs:jobs", args=[org.slug])}"' in rest
