"""The Checkout follow-up handler moved from `billing.webhooks` to `billing.stripe_events`:
messages owed under the old path are delivered under the new one."""

from django.db import migrations

OLD = "billing.webhooks.payment_method_default"
NEW = "billing.stripe_events.payment_method_default"


def handler_path_move(apps, schema_editor):
    apps.get_model("outbox", "Message").objects.filter(handler=OLD).update(handler=NEW)


def handler_path_restore(apps, schema_editor):
    apps.get_model("outbox", "Message").objects.filter(handler=NEW).update(handler=OLD)


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0009_open_accounts_of_existing_organizations"),
        ("outbox", "0001_messages"),
    ]

    operations = [migrations.RunPython(handler_path_move, handler_path_restore)]
