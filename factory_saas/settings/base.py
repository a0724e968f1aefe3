"""Settings shared by every environment; every value comes from the environment."""

from pathlib import Path

import environ
from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

SECRET_KEY = env("SECRET_KEY", default="")
# Old keys still accepted for signatures while a new SECRET_KEY rolls out (see docs/operations.md).
SECRET_KEY_FALLBACKS = env.list("SECRET_KEY_FALLBACKS", default=[])
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SITE_URL = env("SITE_URL", default="http://127.0.0.1:8000")
# Kubernetes hands each pod its address (docs/operations.md, Kubernetes): the kubelet's probes
# and Prometheus reach a pod by it, so it is one more host the pod answers to.
if POD_IP := env("POD_IP", default=""):
    ALLOWED_HOSTS = [*ALLOWED_HOSTS, POD_IP]
# Proxies in front of the web process that append the address they saw to X-Forwarded-For (one
# load balancer: 1). The failed-login limit, the API's rate limits and the audit log all take
# the client's address from it; 0 ignores the header, which a client could otherwise forge.
TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", default=0)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "django_prometheus",
    "allauth",
    "allauth.account",
    "outbox",
    "tenants",
    "registry",
    "jobs",
    "billing",
    "serving",
    "webhooks",
    "factory_saas",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "factory_saas.middleware.ContentSecurityPolicyMiddleware",
    # With PrometheusAfterMiddleware last, they time every request the app answers for
    # Prometheus (GET /metrics); production's static files (whitenoise, inserted before this)
    # and HTTPS redirects are not counted.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "factory_saas.urls"
WSGI_APPLICATION = "factory_saas.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tenants.context_processors.organizations",
                "billing.context_processors.billing_banner",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="")
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTH_USER_MODEL = "tenants.User"
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "dashboard:home"
ACCOUNT_LOGOUT_REDIRECT_URL = "account_login"
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_EMAIL_VERIFICATION = env("ACCOUNT_EMAIL_VERIFICATION", default="mandatory")
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
# Failed logins are throttled per account and per address; the admin logs in through the same
# form, so the same limit guards it.
ACCOUNT_RATE_LIMITS = {
    "login_failed": env("LOGIN_FAILED_RATE_LIMIT", default="10/m/ip,5/5m/key"),
}
# The adapter reads TRUSTED_PROXY_COUNT per request (tenants.actors.client_ip); allauth's own
# setting agrees for anything that reads it directly.
ACCOUNT_ADAPTER = "tenants.adapters.AccountAdapter"
ALLAUTH_TRUSTED_PROXY_COUNT = TRUSTED_PROXY_COUNT

EMAIL_CONFIG = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
# A mail server that hangs fails as a timeout (an OSError the outbox's mail handlers retry)
# instead of holding the worker until Celery's time limit gives the message up.
EMAIL_TIMEOUT = env.float("EMAIL_TIMEOUT", default=30.0)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="factory_saas <noreply@localhost>")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env("STATIC_ROOT", default=str(BASE_DIR / "var" / "staticfiles"))

# Object storage for datasets and artifacts (filled by the registry): S3 when an endpoint or
# bucket is set, a local directory otherwise.
STORAGE_BACKEND = env("STORAGE_BACKEND", default="local")
STORAGE_LOCAL_ROOT = env("STORAGE_LOCAL_ROOT", default=str(BASE_DIR / "var" / "storage"))
S3_ENDPOINT_URL = env("S3_ENDPOINT_URL", default="")
S3_BUCKET = env("S3_BUCKET", default="factory-saas")
S3_REGION = env("S3_REGION", default="us-east-1")
S3_ACCESS_KEY_ID = env("S3_ACCESS_KEY_ID", default="")
S3_SECRET_ACCESS_KEY = env("S3_SECRET_ACCESS_KEY", default="")
# Until plans land with billing, every organization gets this storage quota.
STORAGE_QUOTA_DEFAULT_BYTES = env.int("STORAGE_QUOTA_DEFAULT_BYTES", default=50 * 1024**3)
DATASET_MAX_UPLOAD_BYTES = env.int("DATASET_MAX_UPLOAD_BYTES", default=5 * 1024**3)
# A dataset version's check silent this long (no progress written; past the check task's hard
# time limit, so it cannot still be running) was lost and is owed again.
DATASET_CHECK_SILENT_S = env.int("DATASET_CHECK_SILENT_S", default=40 * 60)
# A code package is source, not data or weights (those are datasets and models): a small limit
# keeps a bomb or a stray checkpoint out, and every upload of one fits in a direct request.
CODE_PACKAGE_MAX_UPLOAD_BYTES = env.int("CODE_PACKAGE_MAX_UPLOAD_BYTES", default=100 * 1024**2)
# An upload in parts: the part size a client gets when it asks for none, and the smallest it
# may ask for (S3 refuses parts under 5 MiB but the last; the local backend has no such floor).
DATASET_UPLOAD_PART_BYTES = env.int("DATASET_UPLOAD_PART_BYTES", default=8 * 1024**2)
DATASET_UPLOAD_PART_MIN_BYTES = env.int("DATASET_UPLOAD_PART_MIN_BYTES", default=5 * 1024**2)
# Started, not yet finalized uploads an organization may hold at once (each reserves quota).
STORAGE_MAX_OPEN_UPLOADS = env.int("STORAGE_MAX_OPEN_UPLOADS", default=20)
# Uploads above this size are spooled to disk by Django, never held in memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_TEMP_DIR = env("FILE_UPLOAD_TEMP_DIR", default=None)

BILLING_CURRENCY = env("BILLING_CURRENCY", default="usd")
# Used for a resource with no row in the price list yet.
DEFAULT_GPU_SECOND_PRICE = env("DEFAULT_GPU_SECOND_PRICE", default="0.0005")

STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY", default="")
STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET", default="")
# Empty: the real Stripe API. Tests point it at a local fake server.
STRIPE_API_BASE = env("STRIPE_API_BASE", default="")
STRIPE_TIMEOUT_S = env.float("STRIPE_TIMEOUT_S", default=10.0)
# The meter-event outbox: rows per claim, retry backoff (doubling, with jitter, capped), and how
# long one push task keeps draining before it leaves the rest to the next beat.
STRIPE_PUSH_BATCH = env.int("STRIPE_PUSH_BATCH", default=100)
STRIPE_PUSH_BACKOFF_S = env.float("STRIPE_PUSH_BACKOFF_S", default=5.0)
STRIPE_PUSH_BACKOFF_MAX_S = env.float("STRIPE_PUSH_BACKOFF_MAX_S", default=3600.0)
STRIPE_PUSH_BUDGET_S = env.float("STRIPE_PUSH_BUDGET_S", default=8.0)
# The most inputs a replica answers in one request; more are a 413 from the replica.
ONLINE_PREDICTION_MAX_ROWS = env.int("ONLINE_PREDICTION_MAX_ROWS", default=100)
# How long a client's Idempotency-Key makes a repeated online prediction the first one's retry
# (Stripe's 24 hours); after that the same key and rows are a new prediction, billed again.
IDEMPOTENCY_WINDOW_S = env.int("IDEMPOTENCY_WINDOW_S", default=24 * 3600)
# Deployments (serving/): how often the reconciler keeps each route's replicas between min and
# max, and the highest max_replicas a deployment may ask for; the forward to a replica (connect
# and whole-answer timeouts, pooled keep-alive connections per web process); the Retry-After a
# caller gets while a replica starts; how many health checks in a row a ready replica may fail
# before it is stopped; how often a request may write Deployment.last_request_at; shadow copies
# (queued in Redis by the web, sent by the control plane every SERVING_SHADOW_DRAIN_S; beyond
# SERVING_SHADOW_QUEUE copies waiting per deployment a copy is dropped and counted, never waited
# for); the largest predict body; the prediction log's retention batch;
# the most rows one saved dataset may hold; and how often, and how many at a time, answered
# requests' prediction charges are priced into the ledger (serving.metering); how long a web
# process routes a deployment from what it read of its routes and replicas (0: read on every
# request; a replica that stopped answering meanwhile makes the request read again at once).
SERVING_RECONCILE_S = env.float("SERVING_RECONCILE_S", default=5.0)
SERVING_MAX_REPLICAS = env.int("SERVING_MAX_REPLICAS", default=20)
SERVING_CONNECT_TIMEOUT_S = env.float("SERVING_CONNECT_TIMEOUT_S", default=2.0)
SERVING_FORWARD_TIMEOUT_S = env.float("SERVING_FORWARD_TIMEOUT_S", default=30.0)
SERVING_POOL_CONNECTIONS = env.int("SERVING_POOL_CONNECTIONS", default=100)
SERVING_COLD_START_RETRY_AFTER_S = env.int("SERVING_COLD_START_RETRY_AFTER_S", default=30)
SERVING_HEALTH_FAILURES = env.int("SERVING_HEALTH_FAILURES", default=3)
SERVING_LAST_REQUEST_EVERY_S = env.int("SERVING_LAST_REQUEST_EVERY_S", default=30)
SERVING_SHADOW_QUEUE = env.int("SERVING_SHADOW_QUEUE", default=1000)
SERVING_SHADOW_DRAIN_S = env.float("SERVING_SHADOW_DRAIN_S", default=1.0)
SERVING_MAX_BODY_BYTES = env.int("SERVING_MAX_BODY_BYTES", default=2 * 2**20)
SERVING_RETENTION_BATCH = env.int("SERVING_RETENTION_BATCH", default=5000)
# A deleted deployment's prediction log is purged in batches of SERVING_RETENTION_BATCH by a task
# that beat runs this often (and a deletion asks for at once), each run for at most this long.
SERVING_PURGE_EVERY_S = env.float("SERVING_PURGE_EVERY_S", default=60.0)
SERVING_PURGE_BUDGET_S = env.float("SERVING_PURGE_BUDGET_S", default=45.0)
SERVING_DATASET_MAX_ROWS = env.int("SERVING_DATASET_MAX_ROWS", default=1_000_000)
SERVING_BILL_EVERY_S = env.float("SERVING_BILL_EVERY_S", default=10.0)
SERVING_BILL_BATCH = env.int("SERVING_BILL_BATCH", default=5000)
SERVING_ROUTING_CACHE_S = env.float("SERVING_ROUTING_CACHE_S", default=1.0)
# What an organization's overview page shows besides its members and activity (tenants imports
# no other app, so the apps that contribute a panel are named here).
ORGANIZATION_OVERVIEW_PANELS = ["jobs.panels.overview_panel", "billing.panels.overview_panel"]
# Days a past-due organization keeps placing jobs before the scheduler stops it.
BILLING_PAST_DUE_GRACE_DAYS = env.int("BILLING_PAST_DUE_GRACE_DAYS", default=7)

# The outbox of side effects owed after a commit (outbox app): retry backoff (doubling, capped),
# how long a delivery holds its row, how long a drain runs, and when a failing one is given up.
OUTBOX_BACKOFF_BASE_S = env.float("OUTBOX_BACKOFF_BASE_S", default=10.0)
OUTBOX_BACKOFF_MAX_S = env.float("OUTBOX_BACKOFF_MAX_S", default=3600.0)
OUTBOX_CLAIM_S = env.float("OUTBOX_CLAIM_S", default=300.0)
OUTBOX_DRAIN_BUDGET_S = env.float("OUTBOX_DRAIN_BUDGET_S", default=8.0)
OUTBOX_GIVE_UP_AFTER_S = env.float("OUTBOX_GIVE_UP_AFTER_S", default=3 * 24 * 3600.0)

# Tenant webhooks (webhooks app). Outbound addresses must be public (checked after DNS
# resolution, and the request pinned to the address checked); only tests that run a receiver
# on this machine open private ones.
WEBHOOKS_ALLOW_PRIVATE_ADDRESSES = env.bool("WEBHOOKS_ALLOW_PRIVATE_ADDRESSES", default=False)
# Secrets are derived from this key (empty: SECRET_KEY) and a stored salt; changing it changes
# every endpoint's secret (receivers must then take the new ones).
WEBHOOKS_SIGNING_KEY = env("WEBHOOKS_SIGNING_KEY", default="")
WEBHOOKS_TIMEOUT_S = env.float("WEBHOOKS_TIMEOUT_S", default=10.0)
WEBHOOKS_RESPONSE_MAX_BYTES = env.int("WEBHOOKS_RESPONSE_MAX_BYTES", default=4096)
WEBHOOKS_GIVE_UP_AFTER_S = env.float("WEBHOOKS_GIVE_UP_AFTER_S", default=3 * 24 * 3600.0)
WEBHOOKS_ROTATION_OVERLAP_S = env.int("WEBHOOKS_ROTATION_OVERLAP_S", default=24 * 3600)
WEBHOOKS_CLAIM_S = env.float("WEBHOOKS_CLAIM_S", default=120.0)
WEBHOOKS_DRAIN_BUDGET_S = env.float("WEBHOOKS_DRAIN_BUDGET_S", default=8.0)
# How long the delivery log keeps an event (and its deliveries' tries) once nothing is owed.
WEBHOOKS_LOG_RETENTION_DAYS = env.int("WEBHOOKS_LOG_RETENTION_DAYS", default=30)

# Drift monitoring (serving.monitoring): how often beat checks, how long one run may take, which
# deployments count as recently used, and bounds on a window (a deployment's drift_window_rows is
# the tenant's choice; a huge one must not load millions of rows into a worker).
DRIFT_CHECK_EVERY_S = env.float("DRIFT_CHECK_EVERY_S", default=60.0)
DRIFT_CHECK_BUDGET_S = env.float("DRIFT_CHECK_BUDGET_S", default=45.0)
DRIFT_RECENT_S = env.int("DRIFT_RECENT_S", default=24 * 3600)
DRIFT_WINDOW_MIN_ROWS = env.int("DRIFT_WINDOW_MIN_ROWS", default=100)
DRIFT_WINDOW_MAX_ROWS = env.int("DRIFT_WINDOW_MAX_ROWS", default=20_000)
DRIFT_MAX_WINDOWS_PER_CHECK = env.int("DRIFT_MAX_WINDOWS_PER_CHECK", default=10)
# Rows younger than this are not read yet: a request still being logged when a window closes
# would otherwise fall behind it and never be reported.
DRIFT_SETTLE_S = env.float("DRIFT_SETTLE_S", default=30.0)
# The factory loop (serving/loop_tasks.py): how often retrain policies, gates and canaries are
# advanced; how far back the live metric that may trigger a retrain is read; how many requests
# (and labelled ones, for metrics) a version needs in a window before it is judged on it; and the
# longest an evaluation job may run.
SERVING_LOOP_TICK_S = env.float("SERVING_LOOP_TICK_S", default=30.0)
SERVING_LOOP_METRIC_WINDOW_S = env.int("SERVING_LOOP_METRIC_WINDOW_S", default=3600)
SERVING_LOOP_MIN_SAMPLES = env.int("SERVING_LOOP_MIN_SAMPLES", default=30)
SERVING_LOOP_EVALUATE_MAX_RUNTIME_S = env.int("SERVING_LOOP_EVALUATE_MAX_RUNTIME_S", default=900)
# The most labelled predictions one retrain appends to its dataset (policy append_feedback).
SERVING_LOOP_FEEDBACK_MAX_ROWS = env.int("SERVING_LOOP_FEEDBACK_MAX_ROWS", default=100_000)

CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_BROKER_TRANSPORT_OPTIONS = {}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TIMEZONE = TIME_ZONE
# Task modules autodiscovery (which finds only `tasks.py`) would miss.
CELERY_IMPORTS = ["serving.monitoring_tasks", "serving.loop_tasks"]
CELERY_BEAT_SCHEDULE = {
    "scheduler-tick": {
        "task": "jobs.scheduler_tick",
        "schedule": env.float("SCHEDULER_TICK_S", default=2.0),
    },
    "billing-storage-meter": {"task": "billing.storage_meter", "schedule": crontab(minute=5)},
    "jobs-storage-sweep": {"task": "jobs.storage_sweep", "schedule": crontab(minute=40)},
    "billing-budget-alerts": {"task": "billing.budget_alerts", "schedule": 300.0},
    "billing-plan-credits": {
        "task": "billing.plan_credits",
        "schedule": crontab(minute=10, hour=0, day_of_month=1),
    },
    # Before the month's plan credits (00:10), so they are not spent on last month's invoice.
    "billing-invoices": {
        "task": "billing.invoices_issue",
        "schedule": crontab(minute=5, hour=0, day_of_month=1),
    },
    "billing-meter-push": {"task": "billing.meter_push", "schedule": 10.0},
    "registry-checks-resend": {
        "task": "registry.dataset_version_checks_resend",
        "schedule": 300.0,
    },
    "outbox-drain": {
        "task": "outbox.drain",
        "schedule": env.float("OUTBOX_DRAIN_EVERY_S", default=10.0),
    },
    "webhooks-drain": {
        "task": "webhooks.drain",
        "schedule": env.float("WEBHOOKS_DRAIN_EVERY_S", default=10.0),
    },
    "webhooks-log-expire": {"task": "webhooks.log_expire", "schedule": crontab(minute=25)},
    "billing-reconcile": {"task": "billing.reconcile", "schedule": crontab(minute=30, hour=3)},
    "serving-drift-check": {"task": "serving.drift_check", "schedule": DRIFT_CHECK_EVERY_S},
    "serving-loop-tick": {"task": "serving.loop_tick", "schedule": SERVING_LOOP_TICK_S},
    "serving-reconcile": {
        "task": "serving.replicas_reconcile",
        "schedule": env.float("SERVING_RECONCILE_S", default=5.0),
    },
    "serving-shadow-drain": {
        "task": "serving.shadow_drain",
        "schedule": SERVING_SHADOW_DRAIN_S,
        # A run that could not start within a few periods is superseded by the next.
        "options": {"expires": max(5.0, SERVING_SHADOW_DRAIN_S * 5)},
    },
    "serving-predictions-bill": {
        "task": "serving.predictions_bill",
        "schedule": SERVING_BILL_EVERY_S,
    },
    "serving-log-retention": {
        "task": "serving.prediction_log_expire",
        "schedule": crontab(minute=20),
    },
    "serving-deployments-purge": {
        "task": "serving.deployments_purge",
        "schedule": SERVING_PURGE_EVERY_S,
    },
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.api.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["tenants.api.permissions.DenyAll"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["factory_saas.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "tenants.api.schema.ApiAutoSchema",
    "DEFAULT_PAGINATION_CLASS": "factory_saas.api_pagination.CreatedCursorPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "factory_saas.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Our throttles take the address from tenants.actors.client_ip; DRF's own agree.
    "NUM_PROXIES": TRUSTED_PROXY_COUNT,
    # One class for every bucket: DRF would count a refused request in each class it asks.
    "DEFAULT_THROTTLE_CLASSES": ["tenants.api.throttles.RateLimit"],
}
# Requests per window ("<n>/s", "/min", "/hour", "/day") in each API bucket (a 429 with
# Retry-After beyond it): per API key, per signed-in user (sessions and keys together), per
# anonymous address, per organization; per organization for each costly operation, which views
# name in `throttle_scopes`; per person for creating organizations (each costs money up front).
# Dashboard form posts count against the same buckets. Cancelling, deleting, revoking and paying
# count only in the caller's own bucket (tenants/api/throttles.py).
API_RATE_LIMITS = {
    "key": env("API_RATE_LIMIT_KEY", default="600/min"),
    "user": env("API_RATE_LIMIT_USER", default="600/min"),
    "anon": env("API_RATE_LIMIT_ANON", default="60/min"),
    "org": env("API_RATE_LIMIT_ORG", default="1200/min"),
    "submit": env("API_RATE_LIMIT_SUBMIT", default="60/min"),
    "upload": env("API_RATE_LIMIT_UPLOAD", default="30/min"),
    "predict": env("API_RATE_LIMIT_PREDICT", default="300/min"),
    "invite": env("API_RATE_LIMIT_INVITE", default="30/hour"),
    "org_create": env("API_RATE_LIMIT_ORG_CREATE", default="10/day"),
}

SPECTACULAR_SETTINGS = {
    "TITLE": "factory_saas API",
    "DESCRIPTION": "Datasets in, models out, on a shared GPU pool. Authenticate with "
    "`Authorization: Bearer <key>`; every tenant route lives under /api/v1/orgs/<slug>/.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "ENUM_NAME_OVERRIDES": {
        "OrganizationStatusEnum": "tenants.models.OrganizationStatus",
        "InvitationStatusEnum": "tenants.models.Invitation.Status",
        "JobStateEnum": "jobs.models.JobState",
        "KindEnum": "jobs.models.Job.Kind",
        "SubmittedJobKindEnum": "jobs.api.serializers.SUBMITTED_KINDS",
        "SweepStateEnum": "jobs.models.Sweep.State",
        "SourceEnum": "registry.models.DatasetVersion.Source",
        "DatasetVersionStateEnum": "registry.models.DatasetVersionState",
        "InvoiceSourceEnum": "billing.models.Invoice.Source",
        "InvoiceStatusEnum": "billing.models.Invoice.Status",
        "ModeEnum": "jobs.models.Sweep.Mode",
        "LoopEventKindEnum": "serving.models.LoopEvent.Kind",
        "RouteModeEnum": "serving.models.Route.Mode",
        "RetrainStateEnum": "serving.models.Retrain.State",
        "WebhookDeliveryStateEnum": "webhooks.models.DeliveryState",
    },
}

# The pool: a worker silent for WORKER_OFFLINE_AFTER_S loses its jobs' leases; they are requeued
# (attempt + 1) and resume from their last checkpoint, up to JOB_MAX_LOST_ATTEMPTS times.
WORKER_HEARTBEAT_S = env.float("WORKER_HEARTBEAT_S", default=3.0)
WORKER_OFFLINE_AFTER_S = env.float("WORKER_OFFLINE_AFTER_S", default=30.0)
WORKER_NAME = env("WORKER_NAME", default="")
WORKER_CPU_SLOTS = env.int("WORKER_CPU_SLOTS", default=2)
WORKER_WORKDIR = env("WORKER_WORKDIR", default=str(BASE_DIR / "var" / "work"))
# Each pool process keeps its next recipe job's child started, torch imported (jobs.runner.warm):
# a job's first step comes seconds sooner, for an idle child's memory per slot.
WORKER_WARM_CHILDREN = env.bool("WORKER_WARM_CHILDREN", default=True)
# The runtimes (named Python environments) this worker offers own-code jobs, each
# `name=/path/to/its/python`, comma-separated; probed once at start, each within the timeout.
# `make worker` and `make run` offer DEFAULT_RUNTIME, the worker's own environment.
DEFAULT_RUNTIME = "torch-2.13-py311"
WORKER_RUNTIMES = env.list("WORKER_RUNTIMES", default=[])
WORKER_RUNTIME_PROBE_TIMEOUT_S = env.float("WORKER_RUNTIME_PROBE_TIMEOUT_S", default=30.0)
JOB_MAX_LOST_ATTEMPTS = env.int("JOB_MAX_LOST_ATTEMPTS", default=3)
JOB_CHECKPOINT_EVERY_S = env.float("JOB_CHECKPOINT_EVERY_S", default=60.0)
JOB_STOP_GRACE_S = env.float("JOB_STOP_GRACE_S", default=3.0)
# A running attempt's utilization (its processes' CPU and memory, its GPUs' use and memory through
# NVML) is sampled this often; an attempt keeps at most UTILIZATION_MAX_SAMPLES of them, thinned
# to every other one (and sampled half as often) each time it reaches that many.
UTILIZATION_SAMPLE_S = env.float("UTILIZATION_SAMPLE_S", default=5.0)
UTILIZATION_MAX_SAMPLES = env.int("UTILIZATION_MAX_SAMPLES", default=2000)
# Serving replicas (serve jobs). Each answers on WORKER_SERVE_HOST at a free port; the default
# keeps it on the machine (one-machine setups), and production sets the worker's advertised
# address, the one the web reaches it at. Stopping one drains its requests in flight for up to
# SERVE_DRAIN_S; a running one is billed every SERVE_BILLING_INTERVAL_S (the rest when it ends).
WORKER_SERVE_HOST = env("WORKER_SERVE_HOST", default="127.0.0.1")
SERVE_DRAIN_S = env.float("SERVE_DRAIN_S", default=30.0)
SERVE_BILLING_INTERVAL_S = env.float("SERVE_BILLING_INTERVAL_S", default=60.0)
# The largest request body a replica reads (an image input is its file in base64).
SERVE_MAX_BODY_BYTES = env.int("SERVE_MAX_BODY_BYTES", default=8 * 2**20)
# A replica whose /healthz has not answered its worker for this long is killed (its attempt fails).
SERVE_UNRESPONSIVE_S = env.float("SERVE_UNRESPONSIVE_S", default=30.0)
# How long an attempt waits out an unreachable object store while fetching its inputs.
JOB_STORAGE_RETRY_S = env.float("JOB_STORAGE_RETRY_S", default=120.0)
# Objects no row refers to are deleted once older than this (a write in flight is younger).
STORAGE_ORPHAN_AGE_S = env.int("STORAGE_ORPHAN_AGE_S", default=6 * 3600)
SCHEDULER_TICK_S = env.float("SCHEDULER_TICK_S", default=2.0)
SCHEDULER_HALF_LIFE_S = env.float("SCHEDULER_HALF_LIFE_S", default=3600.0)
# Quotas an organization gets in each resource class until an operator (or its plan) sets them.
DEFAULT_QUOTA = {
    "guaranteed_gpus": env.int("DEFAULT_QUOTA_GUARANTEED_GPUS", default=0),
    "limit_gpus": env.int("DEFAULT_QUOTA_LIMIT_GPUS", default=8),
    "max_running_jobs": env.int("DEFAULT_QUOTA_MAX_RUNNING_JOBS", default=10),
    "max_queued_jobs": env.int("DEFAULT_QUOTA_MAX_QUEUED_JOBS", default=100),
}

# Prometheus (docs/operations.md, Metrics): GET /metrics on the web, and on METRICS_PORT of the
# control plane's Celery worker (0: no server), answer only `Authorization: Bearer
# <METRICS_TOKEN>`; with no token set they refuse every scrape. Queue depth per tenant names the
# METRICS_TOP_TENANTS organizations with the most queued jobs and sums the rest.
METRICS_TOKEN = env("METRICS_TOKEN", default="")
METRICS_PORT = env.int("METRICS_PORT", default=0)
METRICS_TOP_TENANTS = env.int("METRICS_TOP_TENANTS", default=20)

API_KEY_LAST_USED_RESOLUTION_S = 60
INVITATION_TTL_DAYS = 7

SECURE_CONTENT_TYPE_NOSNIFF = True
# Scripts only from our own origin (htmx and charts are vendored under static/).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; "
    "form-action 'self'; object-src 'none'"
)
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    # The stripe library logs two INFO lines per request: one per meter event is too many; httpx
    # one per request, which is one per prediction forwarded to a replica.
    "loggers": {
        "stripe": {"level": env("STRIPE_LOG_LEVEL", default="WARNING")},
        "httpx": {"level": env("HTTPX_LOG_LEVEL", default="WARNING")},
    },
}
