from django.db import migrations


def backfill(apps, schema_editor):
    """Events stored before object_id existed: take the id from the payload once."""
    WebhookEvent = apps.get_model("billing", "WebhookEvent")
    for event in WebhookEvent.objects.filter(object_id="").iterator():
        obj = (event.payload.get("data") or {}).get("object") or {}
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            event.object_id = obj["id"][:100]
            event.save(update_fields=["object_id"])


class Migration(migrations.Migration):
    dependencies = [("billing", "0007_usage_created_at_webhook_object")]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
