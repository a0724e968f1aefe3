from django.db import migrations

CLASSES = [
    ("cpu", "CPU", 0, []),
    ("l4", "NVIDIA L4", 24, ["L4"]),
    ("a100-40gb", "NVIDIA A100 40GB", 40, ["A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"]),
    ("h100-80gb", "NVIDIA H100 80GB", 80, ["H100"]),
    ("h200-141gb", "NVIDIA H200", 141, ["H200"]),
]


def create(apps, schema_editor):
    ResourceClass = apps.get_model("jobs", "ResourceClass")
    for name, display, memory, patterns in CLASSES:
        ResourceClass.objects.get_or_create(
            name=name,
            defaults={"display_name": display, "gpu_memory_gb": memory, "device_name_patterns": patterns},
        )


class Migration(migrations.Migration):
    dependencies = [("jobs", "0001_initial")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
