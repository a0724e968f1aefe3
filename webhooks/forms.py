"""Dashboard forms for webhook endpoints."""

from django import forms

from .events import EVENT_TYPES


class EndpointForm(forms.Form):
    url = forms.CharField(
        label="URL",
        max_length=2000,
        help_text="http(s), at a public address; events are POSTed here, signed.",
    )
    description = forms.CharField(max_length=200, required=False)
    event_types = forms.MultipleChoiceField(
        label="Events",
        choices=[(name, f"{name}: {text}") for name, text in EVENT_TYPES.items()],
        widget=forms.CheckboxSelectMultiple,
    )


class EndpointUpdateForm(EndpointForm):
    enabled = forms.BooleanField(required=False, label="Enabled: events are sent to it")
