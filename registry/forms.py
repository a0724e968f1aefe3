from django import forms

from .models import name_validator


class NamedForm(forms.Form):
    name = forms.CharField(max_length=100, validators=[name_validator], help_text="e.g. churn-2026")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))


class CodePackageUploadForm(forms.Form):
    file = forms.FileField(
        label="Package archive",
        help_text="A .zip or .tar.gz of the package folder, with factory.toml at its root.",
    )


class AliasForm(forms.Form):
    alias = forms.CharField(max_length=100, validators=[name_validator], initial="production")
    version = forms.ChoiceField(choices=())

    def __init__(self, *args, versions, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["version"].choices = [(v.number, f"v{v.number}") for v in versions]
