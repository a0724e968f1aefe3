"""Dashboard pages for jobs: the list, the submit and predict forms, a job, sweeps."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect
from django.views import View
from django.views.generic import TemplateView

from jobs import selectors, services
from jobs.charts import metric_chart, utilization_charts
from jobs.forms import CodeRunForm, JobForm, PredictForm
from jobs.models import Job, JobEvent, JobLog, JobMetric, JobState, ResourceClass, Sweep
from jobs.recipes.catalog import get_recipe, list_recipes
from jobs.services import sweeps
from registry.models import CodePackageVersion, ModelVersion
from tenants.errors import DomainError
from tenants.standing import Effect
from tenants.views.base import OrganizationPageMixin

LOG_TAIL = 200


class JobsPage(OrganizationPageMixin, TemplateView):
    template_name = "jobs/jobs.html"
    required_scopes = {"get": "jobs:read"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        state = self.request.GET.get("state") or None
        if state not in JobState.values:
            state = None
        jobs = selectors.job_list(
            organization=self.organization, state=state, label=self.request.GET.get("label") or None
        )
        context["page"] = Paginator(jobs, 50).get_page(self.request.GET.get("page"))
        selectors.queue_positions_attach(
            organization=self.organization, jobs=context["page"].object_list
        )
        selectors.slot_seconds_attach(
            organization=self.organization, jobs=context["page"].object_list
        )
        context["states"] = JobState.choices
        context["state"] = state
        context["recipes"] = sorted(list_recipes())
        query = self.request.GET.copy()
        query.pop("page", None)
        context["query"] = query.urlencode()
        return context


class JobSubmitPage(OrganizationPageMixin, TemplateView):
    template_name = "jobs/job_submit.html"
    required_scopes = {"get": "jobs:write", "post": "jobs:write"}
    throttle_scopes = {"post": "submit"}

    def _recipe(self):
        try:
            return get_recipe(self.request.GET.get("recipe") or sorted(list_recipes())[0])
        except DomainError as exc:
            raise Http404(exc.detail) from exc

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        recipe = kwargs.get("recipe") or self._recipe()
        context.setdefault("form", JobForm(organization=self.organization, recipe=recipe))
        context["recipe"] = recipe
        context["recipes"] = sorted(list_recipes())
        priced = selectors.resource_classes_with_prices()
        context["prices"] = {rc.name: price * 3600 for rc, price, _c in priced}
        # For the form's live estimate, keyed like the resource class <select>'s options.
        context["second_prices"] = {rc.name: str(price) for rc, price, _c in priced}
        return context

    def post(self, request, org_slug):
        recipe = self._recipe()
        form = JobForm(request.POST, organization=self.organization, recipe=recipe)
        if form.is_valid():
            data = form.cleaned_data
            try:
                job, _ = services.training_job_submit(
                    organization=self.organization,
                    actor=self.actor,
                    recipe=recipe.name,
                    parameters=form.cleaned_parameters(),
                    dataset_version=data["dataset_version"],
                    output_model_name=data["output_model"],
                    options=services.JobOptions(
                        resource_class=data["resource_class"],
                        gpu_count=data["gpu_count"],
                        priority=data["priority"],
                        max_runtime_s=data["max_runtime_s"],
                        labels=data["labels"],
                    ),
                )
            except DomainError as error:
                for field, errors in (error.fields or {"": [error.detail]}).items():
                    target = (
                        field
                        if field in form.fields
                        else f"param_{field.removeprefix('parameters.')}"
                    )
                    for message in errors:
                        form.add_error(target if target in form.fields else None, message)
            else:
                messages.success(request, f"Job {job.pk} queued.")
                return redirect("jobs:job", org_slug, job.pk)
        return self.render_to_response(self.get_context_data(form=form, recipe=recipe), status=400)


class CodeRunPage(OrganizationPageMixin, TemplateView):
    """Run a code package version: a form drawn from its parameters schema, submitted as a job."""

    template_name = "jobs/code_run.html"
    required_scopes = {"get": "jobs:write", "post": "jobs:write"}
    throttle_scopes = {"post": "submit"}
    model = CodePackageVersion
    lookup_fields = {"package__name": "name", "number": "number"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("package")

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        version = self.get_org_object()
        context.setdefault("form", CodeRunForm(organization=self.organization, version=version))
        context["version"] = version
        priced = selectors.resource_classes_with_prices()
        context["prices"] = {rc.name: price * 3600 for rc, price, _c in priced}
        context["second_prices"] = {rc.name: str(price) for rc, price, _c in priced}
        return context

    def post(self, request, org_slug, name, number):
        version = self.get_org_object()
        form = CodeRunForm(request.POST, organization=self.organization, version=version)
        if form.is_valid():
            data = form.cleaned_data
            try:
                job, _ = services.code_job_submit(
                    organization=self.organization,
                    actor=self.actor,
                    code_package_version=version,
                    parameters=form.cleaned_parameters(),
                    dataset_version=data["dataset_version"],
                    model_version=data["model_version"],
                    output_model_name=data.get("output_model", ""),
                    output_dataset_name=data.get("output_dataset", ""),
                    options=services.JobOptions(
                        resource_class=data["resource_class"],
                        max_runtime_s=data["max_runtime_s"],
                    ),
                )
            except DomainError as error:
                for where, errors in (error.fields or {"": [error.detail]}).items():
                    for message in errors:
                        form.add_error(form.field_for_error(where), message)
            else:
                messages.success(request, f"Job {job.pk} queued: {version}.")
                return redirect("jobs:job", org_slug, job.pk)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class JobPredictPage(OrganizationPageMixin, TemplateView):
    """Batch prediction: a model version over a dataset version, written to a new dataset."""

    template_name = "jobs/job_predict.html"
    required_scopes = {"get": "jobs:write", "post": "jobs:write"}
    throttle_scopes = {"post": "submit"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        initial = {"model_version": self.request.GET.get("model_version")}
        context.setdefault("form", PredictForm(organization=self.organization, initial=initial))
        return context

    def post(self, request, org_slug):
        form = PredictForm(request.POST, organization=self.organization)
        if form.is_valid():
            data = form.cleaned_data
            try:
                job, _ = services.inference_job_submit(
                    organization=self.organization,
                    actor=self.actor,
                    model_version=data["model_version"],
                    dataset_version=data["dataset_version"],
                    output_dataset_name=data["output_dataset"],
                    options=services.JobOptions(resource_class=data["resource_class"]),
                )
            except DomainError as error:
                form.add_error(None, error.detail)
            else:
                messages.success(request, f"Prediction job {job.pk} queued.")
                return redirect("jobs:job", org_slug, job.pk)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class ModelVersionExportAction(OrganizationPageMixin, View):
    """The model version page's export button: an edge export job on the CPU class."""

    model = ModelVersion
    lookup_fields = {"registered_model__name": "name", "number": "number"}
    required_scopes = {"post": "jobs:write"}
    throttle_scopes = {"post": "submit"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("registered_model")

    def post(self, request, org_slug, name, number):
        version = self.get_org_object()
        try:
            job, _ = services.export_job_submit(
                organization=self.organization,
                actor=self.actor,
                model_version=version,
                options=services.JobOptions(resource_class=ResourceClass.objects.get(name="cpu")),
            )
        except DomainError as error:
            messages.error(request, error.detail)
            return redirect("registry:model_version", org_slug, name, number)
        messages.success(request, f"Edge export job {job.pk} queued for {version}.")
        return redirect("jobs:job", org_slug, job.pk)


class JobPage(OrganizationPageMixin, TemplateView):
    """Timeline, live log tail and metric charts; htmx refreshes the live part while active."""

    template_name = "jobs/job.html"
    required_scopes = {"get": "jobs:read"}
    model = Job

    def narrow_queryset(self, queryset):
        return selectors.job_list(organization=self.organization)

    def get_template_names(self):
        # The live part for its own refresh; a boosted navigation (a link, a form's redirect)
        # needs the whole page.
        htmx = self.request.htmx
        return ["jobs/_job_live.html"] if htmx and not htmx.boosted else [self.template_name]

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        job = self.get_org_object()
        selectors.slot_seconds_attach(organization=self.organization, jobs=[job])
        logs = list(
            JobLog.objects.for_organization(self.organization)
            .filter(job=job)
            .order_by("-pk")[:LOG_TAIL]
        )
        series: dict[str, list[tuple[int, float]]] = {}
        for step, name, split, value in (
            JobMetric.objects.for_organization(self.organization)
            .filter(job=job)
            .order_by("step", "pk")
            .values_list("step", "name", "split", "value")[:20_000]
        ):
            series.setdefault(f"{split} {name}".strip(), []).append((step, value))
        context.update(
            job=job,
            events=JobEvent.objects.for_organization(self.organization).filter(job=job),
            logs=reversed(logs),
            charts=[chart for name, pts in series.items() if (chart := metric_chart(name, pts))],
            cost_so_far=selectors.job_cost_so_far(job=job),
            utilization_charts=utilization_charts(
                selectors.utilization_series(organization=self.organization, job=job)
            ),
            rightsizing_hint=selectors.job_rightsizing_hint(
                utilization=job.utilization,
                resource_class_name=job.resource_class.name,
                gpu_count=job.gpu_count,
            ),
        )
        return context


class _JobAction(OrganizationPageMixin, View):
    model = Job
    required_scopes = {"post": "jobs:write"}

    def post(self, request, org_slug, pk):
        job = self.get_org_object()
        try:
            result = self.perform(job)
        except DomainError as error:
            messages.error(request, error.detail)
            return redirect("jobs:job", org_slug, pk)
        return redirect("jobs:job", org_slug, result.pk)


class JobCancelAction(_JobAction):
    effects = {"post": Effect.REDUCE}

    def perform(self, job):
        job = services.job_cancel(job=job, actor=self.actor)
        messages.success(self.request, "Cancelling: the job stops within a few seconds.")
        return job


class JobRetryAction(_JobAction):
    throttle_scopes = {"post": "submit"}

    def perform(self, job):
        retried = services.job_retry(job=job, actor=self.actor)
        messages.success(self.request, f"Submitted again as job {retried.pk}.")
        return retried


class SweepsPage(OrganizationPageMixin, TemplateView):
    template_name = "jobs/sweeps.html"
    required_scopes = {"get": "jobs:read"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        sweeps = Sweep.objects.for_organization(self.organization).select_related("best_job")
        context["page"] = Paginator(sweeps, 50).get_page(self.request.GET.get("page"))
        return context


class SweepPage(OrganizationPageMixin, TemplateView):
    """A sweep's trials side by side: their parameters, state and the chosen metric."""

    template_name = "jobs/sweep.html"
    required_scopes = {"get": "jobs:read"}
    model = Sweep

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        sweep = self.get_org_object()
        trials = list(sweep.trials.select_related("output_model_version").order_by("pk"))
        names = sorted(sweep.space)
        context.update(
            sweep=sweep,
            parameter_names=names,
            rows=[
                (
                    trial,
                    [trial.parameters.get(name) for name in names],
                    trial.output_model_version.metrics.get(sweep.metric)
                    if trial.output_model_version
                    else None,
                )
                for trial in trials
            ],
        )
        return context


class SweepCancelAction(OrganizationPageMixin, View):
    model = Sweep
    required_scopes = {"post": "jobs:write"}
    effects = {"post": Effect.REDUCE}

    def post(self, request, org_slug, pk):
        try:
            sweeps.sweep_cancel(sweep=self.get_org_object(), actor=self.actor)
        except DomainError as error:
            messages.error(request, error.detail)
        else:
            messages.success(request, "Sweep cancelled; its running trials stop within seconds.")
        return redirect("jobs:sweep", org_slug, pk)
