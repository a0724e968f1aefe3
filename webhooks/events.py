"""The event types an endpoint may subscribe to, with what each means to a receiver."""

EVENT_TYPES: dict[str, str] = {
    "job.succeeded": "A job finished and its outputs are registered",
    "job.failed": "A job failed (its reason is in the payload)",
    "job.cancelled": "A job was cancelled",
    "model.version_created": "A model version was registered",
    "model.alias_moved": "A model alias was pointed at a version, or removed",
    "billing.budget_threshold_reached": "This month's spend crossed a budget threshold",
    "invoice.paid": "An invoice was paid",
    "invoice.payment_failed": "Payment of an invoice failed",
    "deployment.created": "A deployment was created",
    "deployment.drift_detected": "Drift was found in a deployment's live inputs or predictions",
    "deployment.retrain_submitted": "A retrain policy submitted a retraining job",
    "deployment.promoted": "A challenger finished its canary and now takes all the traffic",
    "deployment.rolled_back": "A canary was rolled back to the champion",
}

# Sent only by "Send test event", to the one endpoint asked; never subscribed to.
TEST_EVENT = "webhook.test"
