"""Dashboard pages for deployments: the list, a deployment with its routes, replicas, live charts,
drift, retrains, the loop's timeline and the retrain policy form, and a retrain's model card with
the approve and reject buttons of the evaluation gate."""

from __future__ import annotations

from datetime import timedelta

from django.contrib import messages
from django.db.models import Count, Q
from django.shortcuts import redirect
from django.utils import timezone
from django.views.generic import TemplateView

from jobs.selectors import job_list, slot_seconds_attach
from registry.models import ModelVersion
from tenants.errors import DomainError
from tenants.standing import Effect
from tenants.views.base import OrganizationPageMixin

from . import gate, services
from .charts import DEFAULT_RANGE, RANGES, drift_chart, version_charts
from .forms import DeploymentCreateForm, RetrainPolicyForm, RoutesForm
from .models import (
    Deployment,
    DriftReport,
    LoopEvent,
    ModelCard,
    Replica,
    Retrain,
    RetrainPolicy,
    Route,
)
from .policies import retrain_policy_set
from .selectors import deployment_traffic, live_metric_of, retrain_list, version_series

READ_SCOPE = "deployments:read"
WRITE_SCOPE = "deployments:write"
DRIFT_REPORTS = 12
LISTED_DEPLOYMENTS = 200
TIMELINE_ROWS = 50
RETRAIN_ROWS = 20


def _version_label(version: ModelVersion) -> str:
    return f"{version.registered_model.name} v{version.number}"


def _form_errors(form, error: DomainError, *, aliases: dict[str, str] | None = None) -> None:
    """A service's refusal on the form: on the field it names (or its alias here), else above."""
    for field, messages_ in (error.fields or {"": [error.detail]}).items():
        target = (aliases or {}).get(field, field)
        for message in messages_:
            form.add_error(target if target in form.fields else None, message)


class DeploymentsPage(OrganizationPageMixin, TemplateView):
    """Every deployment with its live routes and last hour; members who may change deployments
    create one here (POST)."""

    template_name = "serving/deployments.html"
    required_scopes = {"get": READ_SCOPE, "post": WRITE_SCOPE}
    model = Deployment

    def narrow_queryset(self, queryset):
        return queryset.select_related("resource_class").annotate(
            replicas_total=Count("replicas", filter=~Q(replicas__state=Replica.State.STOPPED)),
            replicas_ready=Count("replicas", filter=Q(replicas__state=Replica.State.READY)),
        )

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        deployments = list(self.get_org_queryset()[: LISTED_DEPLOYMENTS + 1])
        context["more"] = len(deployments) > LISTED_DEPLOYMENTS
        deployments = deployments[:LISTED_DEPLOYMENTS]
        routes: dict[int, list[Route]] = {}
        for route in (
            Route.objects.for_organization(self.organization)
            .filter(deployment__in=deployments, mode=Route.Mode.LIVE)
            .select_related("model_version__registered_model")
        ):
            routes.setdefault(route.deployment_id, []).append(route)
        traffic = deployment_traffic(
            organization=self.organization, since=timezone.now() - timedelta(hours=1)
        )
        context["listed"] = LISTED_DEPLOYMENTS
        context["rows"] = [
            {
                "deployment": deployment,
                "routes": routes.get(deployment.pk, []),
                "traffic": traffic.get(deployment.pk),
                "error_percent": (
                    traffic[deployment.pk].error_rate * 100 if deployment.pk in traffic else None
                ),
            }
            for deployment in deployments
        ]
        context["api_url"] = self.request.build_absolute_uri(
            f"/api/v1/orgs/{self.organization.slug}/deployments/"
        )
        if self.has_scope(WRITE_SCOPE):
            context.setdefault("create_form", DeploymentCreateForm(organization=self.organization))
        return context

    def post(self, request, org_slug):
        form = DeploymentCreateForm(request.POST, organization=self.organization)
        if form.is_valid():
            data = form.cleaned_data
            version = data["model_version"]
            try:
                deployment = services.deployment_create(
                    organization=self.organization,
                    name=data["name"],
                    recipe=version.recipe_name,
                    resource_class=data["resource_class"],
                    actor=self.actor,
                    routes=[{"model_version": version.pk, "weight": 100, "mode": Route.Mode.LIVE}],
                    min_replicas=data["min_replicas"],
                    max_replicas=data["max_replicas"],
                )
            except DomainError as error:
                _form_errors(
                    form, error, aliases={"recipe": "model_version", "routes": "model_version"}
                )
            else:
                messages.success(request, f"Deployment {deployment.name} created.")
                return redirect("serving:deployment", org_slug, deployment.name)
        return self.render_to_response(self.get_context_data(create_form=form), status=400)


class DeploymentPage(OrganizationPageMixin, TemplateView):
    """Everything about one deployment; a member who may change it also edits its retrain
    policy here (POST), a viewer sees the policy read-only."""

    template_name = "serving/deployment.html"
    required_scopes = {"get": READ_SCOPE, "post": WRITE_SCOPE}
    # Changing the policy spends nothing by itself; the loop checks the standing when it spends.
    effects = {"post": Effect.CHANGE}
    model = Deployment
    lookup_fields = {"name": "name"}

    def _policy(self, deployment) -> RetrainPolicy:
        """The saved policy, or an unsaved one with the defaults (a GET writes nothing)."""
        saved = (
            RetrainPolicy.objects.for_organization(self.organization)
            .filter(deployment=deployment)
            .first()
        )
        return saved or RetrainPolicy(organization=self.organization, deployment=deployment)

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        deployment = self.get_org_object()
        organization = self.organization
        routes = list(
            Route.objects.for_organization(organization)
            .filter(deployment=deployment)
            .select_related("model_version__registered_model")
        )
        range_key = self.request.GET.get("range")
        if range_key not in RANGES:
            range_key = DEFAULT_RANGE
        policy = self._policy(deployment)
        read_only = not self.has_scope(WRITE_SCOPE)
        if not read_only:
            context.setdefault(
                "routes_form",
                RoutesForm(organization=organization, deployment=deployment, routes=routes),
            )
        context.setdefault(
            "form",
            RetrainPolicyForm(organization=organization, policy=policy, read_only=read_only),
        )
        context.update(
            deployment=deployment,
            routes=routes,
            live_weight=sum(r.weight for r in routes if r.mode == Route.Mode.LIVE),
            replicas=self._replicas(deployment),
            ranges=[(key, r.label) for key, r in RANGES.items()],
            range_key=range_key,
            charts=self._charts(deployment, routes, RANGES[range_key]),
            metric=live_metric_of(deployment.recipe)[0],
            drift=self._drift(deployment),
            retrains=retrain_list(organization=organization, deployment=deployment)[:RETRAIN_ROWS],
            timeline=(
                LoopEvent.objects.for_organization(organization)
                .filter(deployment=deployment)
                .select_related("job", "model_version__registered_model")[:TIMELINE_ROWS]
            ),
            policy=policy,
            policy_saved=policy.pk is not None,
            policy_read_only=read_only,
        )
        return context

    def _replicas(self, deployment) -> list[Replica]:
        """The replicas not stopped, each with its serve job (`serve_job`: state, worker)."""
        replicas = list(
            Replica.objects.for_organization(self.organization)
            .filter(deployment=deployment)
            .exclude(state=Replica.State.STOPPED)
            .select_related("model_version__registered_model")
        )
        jobs = job_list(organization=self.organization).filter(
            pk__in=[replica.job_id for replica in replicas]
        )
        by_id = {job.pk: job for job in jobs}
        for replica in replicas:
            replica.serve_job = by_id.get(replica.job_id)
        return replicas

    def _charts(self, deployment, routes: list[Route], span) -> list[dict]:
        """Per version over `span`'s windows; versions no longer routed are named too."""
        now = timezone.now()
        end = span.end_after(now)
        series = version_series(
            deployment=deployment, start=end - span.span, end=end, windows=span.windows
        )
        names = {route.model_version_id: _version_label(route.model_version) for route in routes}
        missing = set(series.stats) - set(names)
        if missing:
            for version in (
                ModelVersion.objects.for_organization(self.organization)
                .filter(pk__in=missing)
                .select_related("registered_model")
                .order_by("pk")
            ):
                names[version.pk] = _version_label(version)
        metric, higher = live_metric_of(deployment.recipe)
        return version_charts(
            series=series, names=names, metric=metric, higher_is_better=higher, now=now
        )

    def _drift(self, deployment) -> dict:
        """The last reports as a table: a column per input column seen in any of them, each
        cell its distance, drifted cells marked."""
        reports = list(
            DriftReport.objects.for_organization(self.organization)
            .filter(deployment=deployment)
            .select_related("model_version__registered_model")[:DRIFT_REPORTS]
        )
        columns = sorted({name for report in reports for name in report.columns})
        for report in reports:
            report.cells = [report.columns.get(name) for name in columns]
        chart = drift_chart(reports=reports, threshold=deployment.drift_column_threshold)
        return {"reports": reports, "columns": columns, "chart": chart}

    def post(self, request, org_slug, name):
        deployment = self.get_org_object()
        form = RetrainPolicyForm(
            request.POST, organization=self.organization, policy=self._policy(deployment)
        )
        if form.is_valid():
            try:
                retrain_policy_set(deployment=deployment, actor=self.actor, **form.cleaned_data)
            except DomainError as error:
                _form_errors(form, error)
            else:
                messages.success(request, "Retrain policy saved.")
                return redirect("serving:deployment", org_slug, name)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class DeploymentRoutesAction(DeploymentPage):
    """The routes form's post: the deployment page again (400) when the routes are refused."""

    required_scopes = {"post": WRITE_SCOPE}
    # Routing starts replicas: what the scope's writes do (spend), not the policy form's change.
    effects = {}

    def post(self, request, org_slug, name):
        deployment = self.get_org_object()
        routes = list(
            Route.objects.for_organization(self.organization).filter(deployment=deployment)
        )
        form = RoutesForm(
            request.POST, organization=self.organization, deployment=deployment, routes=routes
        )
        if form.is_valid():
            try:
                services.routes_set(
                    deployment=deployment, routes=form.cleaned_data["routes"], actor=self.actor
                )
            except DomainError as error:
                form.add_error(None, error.detail)
            else:
                messages.success(request, "Routes changed.")
                return redirect("serving:deployment", org_slug, name)
        return self.render_to_response(self.get_context_data(routes_form=form), status=400)


def _card_of(retrain: Retrain) -> ModelCard | None:
    try:
        return retrain.model_card
    except ModelCard.DoesNotExist:
        return None


def _metric_rows(metrics: dict) -> list[dict]:
    """Overall, then each slice: both versions' scores and how much better the challenger is
    (positive: better, whichever way the metric points)."""
    challenger, champion = metrics.get("challenger") or {}, metrics.get("champion") or {}
    sign = 1 if metrics.get("higher_is_better", True) else -1
    rows = [("overall", challenger.get("overall"), champion.get("overall"))]
    new_slices, old_slices = challenger.get("slices") or {}, champion.get("slices") or {}
    for value in sorted(set(new_slices) | set(old_slices), key=str):
        rows.append((value, new_slices.get(value), old_slices.get(value)))
    table = []
    for name, new, old in rows:
        numbers = isinstance(new, int | float) and isinstance(old, int | float)
        table.append(
            {
                "name": name,
                "challenger": new,
                "champion": old,
                "gain": sign * (new - old) if numbers else None,
            }
        )
    return table


class RetrainPage(OrganizationPageMixin, TemplateView):
    """A retrain and its model card, readable by a person: lineage, metrics overall and per slice
    against the champion, the gate's decision and who approved. Members with `models:promote`
    get the approve and reject buttons while the retrain awaits approval."""

    template_name = "serving/retrain.html"
    required_scopes = {"get": READ_SCOPE}
    model = Retrain
    lookup_fields = {"deployment__name": "name", "pk": "pk"}

    def narrow_queryset(self, queryset):
        # A deleted deployment's retrains went with it, even while a new deployment has its name.
        return queryset.filter(deployment__deleted_at__isnull=True).select_related(
            "deployment",
            "champion__registered_model",
            "challenger__registered_model",
            "job",
            "evaluation_job",
            "model_card__approved_by",
        )

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        retrain = self.get_org_object()
        card = _card_of(retrain)
        lineage = card.lineage if card else {}
        parent = None
        if lineage.get("parent_version"):
            parent = (
                ModelVersion.objects.for_organization(self.organization)
                .filter(pk=lineage["parent_version"])
                .select_related("registered_model")
                .first()
            )
        jobs = [job for job in (retrain.job, retrain.evaluation_job) if job]
        slot_seconds_attach(organization=self.organization, jobs=jobs)
        costs = [job.cost_minor for job in jobs]
        context.update(
            deployment=retrain.deployment,
            retrain=retrain,
            card=card,
            lineage=lineage,
            parent=parent,
            metrics=card.metrics if card else {},
            metric_rows=_metric_rows(card.metrics) if card else [],
            cost_minor=sum(costs),
            can_decide=(
                retrain.state in Retrain.AWAITING_DECISION_STATES
                and card is not None
                and self.has_scope(gate.PROMOTE_SCOPE)
            ),
        )
        return context


class _RetrainDecision(RetrainPage):
    """A button of the card page: back to the card with what happened, or the card again with
    why it was refused (and the reason typed kept)."""

    required_scopes = {"post": gate.PROMOTE_SCOPE}

    def decide(self, card: ModelCard) -> str:
        raise NotImplementedError

    def post(self, request, org_slug, name, pk):
        retrain = self.get_org_object()
        card = _card_of(retrain)
        try:
            if card is None:
                raise DomainError("The gate has not decided on this retrain yet.")
            done = self.decide(card)
        except DomainError as error:
            context = self.get_context_data(
                decision_error=error.detail, reason=request.POST.get("reason", "")
            )
            return self.render_to_response(context, status=error.status)
        messages.success(request, done)
        return redirect("serving:retrain", org_slug, name, pk)


class RetrainApproveAction(_RetrainDecision):
    # Approving starts a canary, whose replicas cost slot-seconds.
    effects = {"post": Effect.SPEND}

    def decide(self, card: ModelCard) -> str:
        retrain = gate.gate_approve(card=card, actor=self.actor)
        if retrain.state == Retrain.State.PROMOTED:  # an inconclusive canary
            return f"{retrain.challenger} promoted: it serves all live traffic."
        return f"{retrain.challenger} approved: it takes {retrain.canary_percent}% as a canary."


class RetrainRejectAction(_RetrainDecision):
    # Turning a challenger down ends a retrain: it lowers spend.
    effects = {"post": Effect.REDUCE}

    def decide(self, card: ModelCard) -> str:
        reason = self.request.POST.get("reason", "").strip()
        if not reason:
            raise DomainError("Say why the challenger is rejected; the reason goes on its card.")
        retrain = gate.gate_reject(card=card, actor=self.actor, reason=reason)
        if retrain.state == Retrain.State.ROLLED_BACK:  # an inconclusive canary
            return f"{retrain.challenger} rolled back: the stable version serves all live traffic."
        return f"{retrain.challenger} rejected."
