"""What tenants tells the apps below it; tenants imports none of them, they subscribe."""

from django.dispatch import Signal

# Sent with `organization` inside `organization_create`'s transaction, so what a receiver
# creates for the new organization commits with it, and a receiver that fails rolls it back.
organization_created = Signal()
