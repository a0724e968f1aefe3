from django.db import migrations, models


def unlink_repeated_retries(apps, schema_editor):
    """Before the constraint: where a job was retried more than once (a double click under the
    old code), the first retry keeps the link; the later ones stay as jobs without it."""
    job = apps.get_model("jobs", "Job")
    repeated = (
        job.objects.filter(retry_of__isnull=False)
        .values("retry_of")
        .annotate(n=models.Count("pk"))
        .filter(n__gt=1)
        .values_list("retry_of", flat=True)
    )
    for original in list(repeated):
        first = job.objects.filter(retry_of=original).order_by("pk").values_list("pk", flat=True)[0]
        job.objects.filter(retry_of=original).exclude(pk=first).update(retry_of=None)


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0006_ops_recent_failures_and_attempts_indexes"),
    ]

    operations = [
        migrations.RunPython(unlink_repeated_retries, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="job",
            constraint=models.UniqueConstraint(
                condition=models.Q(("retry_of__isnull", False)),
                fields=("organization", "retry_of"),
                name="job_retried_once",
            ),
        ),
    ]
