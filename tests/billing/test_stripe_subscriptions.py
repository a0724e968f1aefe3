"""The Stripe subscription follows the account: owed when the account is opened, anchored to our
calendar months, and its fee item following the plan; a periodic run catches accounts opened
before Stripe was configured."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import stripe
from django.utils import timezone

from billing import selectors, services, stripe_sync, tasks
from billing.models import BillingAccount, Plan, StripeObject
from outbox.models import Message
from outbox.services import outbox_drain
from tenants.actors import Actor
from tests.factories import OrganizationFactory, PriceFactory

GPU = "gpu:test-a100"
pytestmark = pytest.mark.django_db


@pytest.fixture
def prices(db):
    return [PriceFactory(resource=GPU, unit_price=Decimal("0.0010"))]


def syncs_owed() -> int:
    return Message.objects.filter(
        handler="billing.stripe_sync.subscription_sync", state=Message.State.PENDING
    ).count()


def subscription_of(fake, org):
    account = BillingAccount.objects.get(organization=org)
    assert account.stripe_subscription_id, "no subscription"
    return fake.objects["subscription"][account.stripe_subscription_id]


def fee_amounts(subscription):
    return [
        item["price"]["unit_amount"]
        for item in subscription["items"]["data"]
        if (item["price"]["recurring"] or {}).get("usage_type") != "metered"
    ]


def metered_items(subscription):
    return {
        item["price"]["id"]: item["id"]
        for item in subscription["items"]["data"]
        if (item["price"]["recurring"] or {}).get("usage_type") == "metered"
    }


def test_a_new_account_gets_its_customer_and_subscription_after_commit_without_usage(
    fake_stripe, prices
):
    org = OrganizationFactory()
    Plan.objects.filter(is_default=True).update(monthly_fee_minor=4900)

    services.billing_account_ensure(organization=org)
    services.billing_account_ensure(organization=org)  # an account is opened once
    assert fake_stripe.requests == []  # nothing was sent inside the transaction
    assert syncs_owed() == 1
    assert outbox_drain() == 1

    subscription = subscription_of(fake_stripe, org)
    assert (
        subscription["customer"] == BillingAccount.objects.get(organization=org).stripe_customer_id
    )
    assert fee_amounts(subscription) == [4900]
    metered = set(StripeObject.objects.filter(kind="price").values_list("stripe_id", flat=True))
    assert StripeObject.objects.filter(kind="price", key=GPU).exists()
    assert set(metered_items(subscription)) == metered


def test_without_stripe_no_subscription_sync_is_owed(no_stripe, prices):
    org = OrganizationFactory()
    services.billing_account_ensure(organization=org)
    services.plan_change(organization=org, plan=Plan.objects.get(code="team"), actor=Actor())
    assert syncs_owed() == 0
    # One owed while Stripe was configured, delivered after it no longer is, does nothing.
    stripe_sync.subscription_sync(account_id=BillingAccount.objects.get(organization=org).pk)


def test_the_push_task_subscribes_accounts_left_without_one(fake_stripe, prices):
    """Accounts opened before Stripe was configured, or whose owed sync was given up."""
    orgs = [OrganizationFactory(), OrganizationFactory()]
    for org in orgs:
        services.billing_account_ensure(organization=org)
    services.plan_change(organization=orgs[1], plan=Plan.objects.get(code="team"), actor=Actor())
    Message.objects.update(state=Message.State.DEAD)

    tasks.meter_push()

    assert fee_amounts(subscription_of(fake_stripe, orgs[0])) == []
    assert fee_amounts(subscription_of(fake_stripe, orgs[1])) == [50_000]
    requests = len(fake_stripe.requests)
    tasks.meter_push()  # every account has one now: nothing more to do
    assert len(fake_stripe.requests) == requests


def test_a_plan_change_swaps_the_fee_item_and_keeps_the_metered_items(fake_stripe, prices):
    org = OrganizationFactory()
    account = services.billing_account_ensure(organization=org)
    stripe_sync.subscription_ensure(account=account)
    before = subscription_of(fake_stripe, org)
    metered = metered_items(before)
    assert fee_amounts(before) == []

    outbox_drain()
    for number, (code, fees) in enumerate([("team", [50_000]), ("payg", []), ("team", [50_000])]):
        services.plan_change(organization=org, plan=Plan.objects.get(code=code), actor=Actor())
        assert outbox_drain() == 1
        subscription = subscription_of(fake_stripe, org)
        assert fee_amounts(subscription) == fees, f"change {number} to {code}"
        assert metered_items(subscription) == metered  # the same items: usage keeps its item

    assert len(fake_stripe.objects["subscription"]) == 1

    def updates():
        return fake_stripe.requests.count(("POST", f"/v1/subscriptions/{before['id']}"))

    assert updates() == 3
    stripe_sync.subscription_sync(account_id=account.pk)  # a repeat changes nothing
    assert updates() == 3


def test_the_subscription_is_anchored_to_the_first_of_next_month_without_proration(
    fake_stripe, prices
):
    account = services.billing_account_ensure(organization=OrganizationFactory())

    stripe_sync.subscription_ensure(account=account)

    subscription = fake_stripe.objects["subscription"][account.stripe_subscription_id]
    this_month = selectors.billing_month(timezone.now())
    _, next_month = selectors.month_bounds(this_month)
    assert subscription["billing_cycle_anchor"] == int(next_month.timestamp())
    assert subscription["proration_behavior"] == "none"


@pytest.mark.parametrize(
    ("now", "anchor"),
    [
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)),
        (datetime(2027, 2, 28, 12, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC)),
    ],
)
def test_the_anchor_is_the_next_first_of_a_month_in_utc(now, anchor):
    assert stripe_sync.next_month_start(now) == anchor


def test_a_subscription_made_by_a_try_whose_answer_was_lost_is_adopted(fake_stripe, prices):
    account = services.billing_account_ensure(organization=OrganizationFactory())
    first = stripe_sync.subscription_ensure(account=account)
    # Our write of the id was lost, and Stripe forgot the idempotency key (after 24 hours).
    BillingAccount.objects.filter(pk=account.pk).update(stripe_subscription_id="")
    account.stripe_subscription_id = ""
    fake_stripe.idempotent.clear()

    assert stripe_sync.subscription_ensure(account=account) == first
    assert len(fake_stripe.objects["subscription"]) == 1


def test_a_refused_fee_change_is_computed_again_from_a_fresh_read(fake_stripe, prices):
    """A racing sync changed the items between our read and our change: Stripe refuses it."""
    org = OrganizationFactory()
    account = services.billing_account_ensure(organization=org)
    subscription_id = stripe_sync.subscription_ensure(account=account)
    update = ("POST", f"/v1/subscriptions/{subscription_id}")
    fake_stripe.fail_next(1, status=400, request=update)

    services.plan_change(organization=org, plan=Plan.objects.get(code="team"), actor=Actor())
    outbox_drain()

    assert fake_stripe.faults_left() == 0
    assert fake_stripe.requests.count(update) == 2
    assert fee_amounts(subscription_of(fake_stripe, org)) == [50_000]

    fake_stripe.fail_next(3, status=400, request=update)
    Plan.objects.filter(code="team").update(monthly_fee_minor=60_000)  # a new fee price
    with pytest.raises(stripe.InvalidRequestError):
        stripe_sync.subscription_sync(account_id=account.pk)
    assert fake_stripe.faults_left() == 0  # three tries, then the error shows
