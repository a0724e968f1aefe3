"""Invitations as the invitee receives them: the token exists only in the e-mail's link."""

import re
from urllib.parse import urlsplit

from django.core import mail

from outbox.services import outbox_drain
from tenants import services


def invitation_link(email: str) -> str:
    """The accept link of the latest invitation e-mail sent to `email`, once the outbox has
    delivered what it owes (as the outbox worker would)."""
    outbox_drain()
    message = next(m for m in reversed(mail.outbox) if m.to == [email])
    return re.search(r"https?://\S+/invitations/\S+", message.body).group(0)


def invitation_token(email: str) -> str:
    return urlsplit(invitation_link(email)).fragment


def invite(*, organization, email, role, actor):
    """Invite through the service and send the e-mail; returns the invitation and mailed token."""
    invitation = services.invitation_create(
        organization=organization, email=email, role=role, actor=actor
    )
    return invitation, invitation_token(invitation.email)
