from django import forms


class BudgetForm(forms.Form):
    monthly_budget = forms.DecimalField(
        required=False,
        min_value=0,
        max_value=10**11,
        decimal_places=2,
        help_text="In dollars per calendar month. Leave empty for no budget.",
    )
    budget_thresholds = forms.CharField(
        required=False,
        max_length=60,
        initial="50, 80, 100",
        help_text="Percentages that send an alert (email, banner, audit log), e.g. 50, 80, 100.",
    )
    budget_hard_cap = forms.BooleanField(
        required=False,
        label="Hard cap: new jobs wait once the budget is reached (running jobs finish)",
    )
    billing_email = forms.EmailField(
        required=False, help_text="Where alerts and invoices go; empty: owners and billing members."
    )

    def clean_budget_thresholds(self):
        raw = self.cleaned_data["budget_thresholds"]
        try:
            return [int(part) for part in raw.replace(",", " ").split()]
        except ValueError:
            raise forms.ValidationError(
                "Whole percentages separated by commas, e.g. 50, 80, 100."
            ) from None
