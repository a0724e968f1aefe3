from django import forms

from .scopes import SCOPES, Role, roles_within


class OrganizationForm(forms.Form):
    name = forms.CharField(max_length=100)


class InvitationForm(forms.Form):
    email = forms.EmailField()
    role = forms.ChoiceField(choices=(), initial=Role.DEVELOPER)

    def __init__(self, *args, granted_scopes: frozenset[str], **kwargs):
        super().__init__(*args, **kwargs)
        # Only the roles one may hand on are offered; the service refuses the others anyway.
        within = roles_within(granted_scopes)
        self.fields["role"].choices = [(v, label) for v, label in Role.choices if v in within]


class InvitationAcceptForm(forms.Form):
    token = forms.CharField(
        max_length=200,
        label="Invitation code",
        help_text="Filled in from the link in your e-mail; without JavaScript, paste the part of "
        "the link after “#”.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Where the key is used, e.g. “CI pipeline”.")
    scopes = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple, choices=())
    expires_at = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Optional. After this moment the key stops working.",
    )

    def __init__(self, *args, granted_scopes: frozenset[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["scopes"].choices = [
            (scope, f"{scope} — {label}")
            for scope, label in SCOPES.items()
            if scope in granted_scopes
        ]


class AuditFilterForm(forms.Form):
    action = forms.CharField(required=False, max_length=64)
    actor = forms.CharField(required=False, max_length=255)
    since = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    until = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
