"""The job submission form: fixed fields plus one field per recipe parameter, from its schema."""

from __future__ import annotations

import json

from django import forms
from django.db.models import Q
from django.forms.models import ModelChoiceIterator

from jobs.models import ResourceClass
from registry.models import DatasetVersion, ModelVersion, name_validator

# A <select> lists at most this many versions, the newest; an organization can hold thousands,
# which made these forms take half a second to render. Older versions are one API call away.
VERSIONS_SHOWN = 200
DATASET_VERSION_HEAVY = ("schema", "profile", "preview")
MODEL_VERSION_HEAVY = ("parameters", "metrics", "input_signature")


class _NewestVersionsIterator(ModelChoiceIterator):
    # Built when the field's queryset is set, before the form knows the chosen value: the
    # options are read from the field when the widget renders.
    @property
    def queryset(self):
        versions = self.field.queryset
        newest = versions.order_by("-created_at", "-pk").values("pk")[:VERSIONS_SHOWN]
        return versions.filter(Q(pk__in=newest) | Q(pk__in=self.field.keep))

    @queryset.setter
    def queryset(self, value):
        """ModelChoiceIterator.__init__ stores the field's queryset; the property reads it."""


class VersionChoiceField(forms.ModelChoiceField):
    """Offers the newest versions (and the chosen one, `keep`); any version of the queryset
    validates, so a link or an API client may still name an older one."""

    iterator = _NewestVersionsIterator

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep: list[int] = []

    def keep_chosen(self, form: forms.Form, name: str) -> None:
        value = form.data.get(name) if form.is_bound else form.initial.get(name)
        self.keep = [int(value)] if str(value or "").isdigit() else []


class _ParameterForm(forms.Form):
    """A form whose `param_<name>` fields are drawn from a JSON Schema of parameters."""

    def parameter_fields(self):
        return [self[name] for name in self.fields if name.startswith("param_")]

    def cleaned_parameters(self) -> dict:
        """The parameters given; a blank optional one is left out for the code's own default."""
        return {
            name.removeprefix("param_"): value
            for name, value in self.cleaned_data.items()
            if name.startswith("param_") and value not in (None, "")
        }


class JobForm(_ParameterForm):
    dataset_version = VersionChoiceField(
        queryset=DatasetVersion.objects.none(), label="Dataset version"
    )
    resource_class = forms.ModelChoiceField(
        queryset=ResourceClass.objects.order_by("name"), to_field_name="name"
    )
    gpu_count = forms.IntegerField(min_value=1, max_value=64, initial=1, label="GPUs")
    priority = forms.IntegerField(min_value=-100, max_value=100, initial=0)
    max_runtime_s = forms.IntegerField(
        min_value=60, max_value=7 * 24 * 3600, initial=3600, label="Max runtime (s)"
    )
    output_model = forms.CharField(
        required=False,
        max_length=100,
        validators=[name_validator],
        help_text="Model to register the result as; default: recipe and dataset name.",
    )
    labels = forms.CharField(
        required=False,
        help_text="One key=value per line, e.g. project=fraud",
        widget=forms.Textarea(attrs={"rows": 2}),
    )

    def __init__(self, *args, organization, recipe, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.fields["dataset_version"].queryset = (
            DatasetVersion.objects.for_organization(organization)
            .filter(format__in=recipe.dataset_formats, state=DatasetVersion.State.READY)
            .select_related("dataset")
            .defer(*DATASET_VERSION_HEAVY)
            .order_by("dataset__name", "-number")
        )
        self.fields["dataset_version"].keep_chosen(self, "dataset_version")
        required = set(recipe.parameter_schema.get("required", []))
        for name, spec in recipe.parameter_schema.get("properties", {}).items():
            self.fields[f"param_{name}"] = _field_for(name, spec, required=name in required)

    def clean_labels(self) -> dict:
        labels = {}
        for line in self.cleaned_data["labels"].splitlines():
            if not line.strip():
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise forms.ValidationError(f"“{line}” is not key=value.")
            labels[key.strip()] = value.strip()
        return labels


class JSONListField(forms.CharField):
    def to_python(self, value):
        value = super().to_python(value)
        if not value:
            return None
        try:
            parsed = json.loads(value if value.strip().startswith("[") else f"[{value}]")
        except json.JSONDecodeError as exc:
            raise forms.ValidationError("Use comma-separated values, e.g. 64, 32.") from exc
        return parsed


def _field_for(name: str, spec: dict, *, required: bool) -> forms.Field:
    label = spec.get("title") or name.replace("_", " ").capitalize()
    common = {
        "label": label,
        "required": required,
        "help_text": spec.get("description", ""),
        "initial": spec.get("default"),
    }
    kind = spec.get("type")
    if kind == "integer":
        return forms.IntegerField(
            min_value=spec.get("minimum"), max_value=spec.get("maximum"), **common
        )
    if kind == "number":
        return forms.FloatField(
            min_value=spec.get("minimum"), max_value=spec.get("maximum"), **common
        )
    if kind == "boolean":
        return forms.BooleanField(**{**common, "required": False})
    if kind == "array":
        initial = spec.get("default")
        return JSONListField(
            **{**common, "initial": ", ".join(map(str, initial)) if initial else ""}
        )
    if "enum" in spec:
        return forms.ChoiceField(choices=[(v, v) for v in spec["enum"]], **common)
    return forms.CharField(max_length=200, **common)


class PredictForm(forms.Form):
    model_version = VersionChoiceField(queryset=ModelVersion.objects.none(), label="Model version")
    dataset_version = VersionChoiceField(
        queryset=DatasetVersion.objects.none(), label="Rows to predict"
    )
    resource_class = forms.ModelChoiceField(
        queryset=ResourceClass.objects.order_by("name"), to_field_name="name"
    )
    output_dataset = forms.CharField(
        required=False,
        max_length=100,
        validators=[name_validator],
        help_text="Dataset to write the predictions to; default: <model>-predictions.",
    )

    def __init__(self, *args, organization, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model_version"].queryset = (
            ModelVersion.objects.for_organization(organization)
            .exclude(recipe_name="")
            .select_related("registered_model")
            .defer(*MODEL_VERSION_HEAVY)
            .order_by("registered_model__name", "-number")
        )
        self.fields["dataset_version"].queryset = (
            DatasetVersion.objects.for_organization(organization)
            .filter(state=DatasetVersion.State.READY)
            .select_related("dataset")
            .defer(*DATASET_VERSION_HEAVY)
            .order_by("dataset__name", "-number")
        )
        for name in ("model_version", "dataset_version"):
            self.fields[name].keep_chosen(self, name)


class CodeRunForm(_ParameterForm):
    """Run a code package version: its parameters drawn from the package's JSON Schema (simple
    types as inputs, anything else as JSON), an optional input dataset, where and how long."""

    dataset_version = VersionChoiceField(
        queryset=DatasetVersion.objects.none(),
        required=False,
        label="Input dataset version",
        help_text="Optional: downloaded for the code, which finds it in factory_job.inputs().",
    )
    model_version = VersionChoiceField(
        queryset=ModelVersion.objects.none(),
        required=False,
        label="Model version to start from",
        help_text="Optional, to fine-tune: its files are in factory_job.inputs()['model'], and "
        "the model the run registers records it as its parent.",
    )
    resource_class = forms.ModelChoiceField(
        queryset=ResourceClass.objects.order_by("name"), to_field_name="name", initial="cpu"
    )
    max_runtime_s = forms.IntegerField(
        min_value=60, max_value=7 * 24 * 3600, initial=3600, label="Max runtime (s)"
    )

    def __init__(self, *args, organization, version, **kwargs):
        super().__init__(*args, **kwargs)
        self.version = version
        self.fields["dataset_version"].queryset = (
            DatasetVersion.objects.for_organization(organization)
            .filter(state=DatasetVersion.State.READY)
            .select_related("dataset")
            .defer(*DATASET_VERSION_HEAVY)
            .order_by("dataset__name", "-number")
        )
        self.fields["dataset_version"].keep_chosen(self, "dataset_version")
        self.fields["model_version"].queryset = (
            ModelVersion.objects.for_organization(organization)
            .select_related("registered_model")
            .defer(*MODEL_VERSION_HEAVY)
            .order_by("registered_model__name", "-number")
        )
        self.fields["model_version"].keep_chosen(self, "model_version")
        outputs = version.manifest["outputs"]
        package = version.package.name
        if outputs["model"]:
            self.fields["output_model"] = forms.CharField(
                required=False,
                max_length=100,
                validators=[name_validator],
                help_text=f"Model to register the result as; default: {package}.",
            )
        if outputs["dataset"]:
            self.fields["output_dataset"] = forms.CharField(
                required=False,
                max_length=100,
                validators=[name_validator],
                help_text=f"Dataset to write the output to; default: {package}-output.",
            )
        schema = version.manifest.get("parameters", {})
        required = set(schema.get("required", []))
        for name, spec in schema.get("properties", {}).items():
            spec = spec if isinstance(spec, dict) else {}
            self.fields[f"param_{name}"] = _schema_field(name, spec, required=name in required)

    def field_for_error(self, where: str) -> str | None:
        """The form field of a submission error's field ("parameters.lr.0" -> "param_lr")."""
        if where.startswith("parameters."):
            where = "param_" + where.removeprefix("parameters.").split(".", 1)[0]
        return where if where in self.fields else None


class JSONValueField(forms.CharField):
    """Any JSON value, for a parameter the form has no input for (an object, an array, a union)."""

    widget = forms.Textarea(attrs={"rows": 3})

    def to_python(self, value):
        value = super().to_python(value)
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"Not JSON: {exc.msg} (line {exc.lineno}).") from exc


def _schema_field(name: str, spec: dict, *, required: bool) -> forms.Field:
    """An input for one property of a code package's parameters schema. Bounds and formats
    beyond a type are the schema's to check on submit (its errors come back on the field)."""
    common = {
        "label": str(spec.get("title") or name.replace("_", " ").capitalize()),
        "required": required,
        "help_text": str(spec.get("description", "")),
        "initial": spec.get("default"),
    }
    kind = spec.get("type")
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        values = {json.dumps(v): v for v in spec["enum"]}
        choices = [(key, str(value)) for key, value in values.items()]
        if not required:
            choices.insert(0, ("", "(the code's default)"))
        initial = json.dumps(spec["default"]) if "default" in spec else None
        return forms.TypedChoiceField(
            choices=choices,
            coerce=values.__getitem__,
            empty_value=None,
            **{**common, "initial": initial},
        )
    if kind == "integer":
        return forms.IntegerField(**common)
    if kind == "number":
        return forms.FloatField(**common)
    if kind == "boolean":
        return forms.BooleanField(**{**common, "required": False})
    if kind == "string":
        return forms.CharField(strip=False, **common)
    initial = json.dumps(spec["default"]) if "default" in spec else None
    return JSONValueField(**{**common, "initial": initial})
