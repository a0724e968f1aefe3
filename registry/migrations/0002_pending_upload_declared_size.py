# Uploads started before sizes were declared get 0: finalizing one fails with a size mismatch
# that asks for a new upload (they expire within PENDING_UPLOAD_TTL anyway).

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="pendingupload",
            name="size_bytes",
            field=models.BigIntegerField(default=0),
            preserve_default=False,
        ),
        migrations.AddConstraint(
            model_name="pendingupload",
            constraint=models.CheckConstraint(
                condition=models.Q(size_bytes__gte=0), name="pending_upload_size_nonneg"
            ),
        ),
    ]
