"""Queued jobs store a reservation as its machine and expected start, not as a counting-down ETA
in the reason; positions are worked out when read (issue 15)."""

import re
from datetime import timedelta

from django.db import migrations, models
from django.utils import timezone

# The reservation's reason as the scheduler wrote it before this migration.
RESERVED = re.compile(r"^(.*) \(reserved: machine (\d+), expected in ~(\d+) (min|h)\)$")


def split_reservations(apps, schema_editor):
    """Each stored reservation reason becomes its reason, machine and an expected start from its
    ETA (to the minute; the next pass stores the exact one)."""
    Job = apps.get_model("jobs", "Job")
    now = timezone.now()
    jobs = []
    for job in Job.objects.filter(state="queued", waiting_reason__contains="(reserved: machine "):
        match = RESERVED.match(job.waiting_reason)
        if match is None:
            continue
        reason, machine, amount, unit = match.groups()
        minutes = int(amount) * (60 if unit == "h" else 1)
        job.waiting_reason, job.reserved_machine = reason, int(machine)
        job.expected_start_at = now + timedelta(minutes=minutes)
        jobs.append(job)
    Job.objects.bulk_update(
        jobs, ["waiting_reason", "reserved_machine", "expected_start_at"], batch_size=1000
    )


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0011_job_kind_export'),
    ]

    operations = [
        migrations.RemoveField(
            model_name='job',
            name='queue_position',
        ),
        migrations.AddField(
            model_name='job',
            name='expected_start_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='job',
            name='reserved_machine',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(split_reservations, migrations.RunPython.noop),
    ]
