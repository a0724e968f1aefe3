"""Credits moved to Stripe's customer balance: spent once, by Stripe, and one refused grant does
not hold up the others."""

import logging

import pytest
from django.utils import timezone

from billing import selectors, services, stripe_sync
from billing.models import BillingAccount, CreditGrant
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def customer(fake):
    """An organization that is a Stripe customer, with no credit of its own yet."""
    org = OrganizationFactory()
    account = services.billing_account_ensure(organization=org)
    stripe_sync.customer_ensure(account=account)
    CreditGrant.objects.filter(organization=org).delete()  # the plan's trial credit
    return org, account


def test_a_pushed_credit_is_moved_to_stripe_and_cannot_be_spent_here(fake_stripe):
    org, account = customer(fake_stripe)
    grant, _ = services.credit_grant(organization=org, amount_minor=500, reason="welcome")
    assert selectors.credits_available(organization=org, at=timezone.now()) == 500

    assert stripe_sync.credit_grants_push() == 1

    grant.refresh_from_db()
    assert grant.stripe_transaction_id in fake_stripe.objects["balance_transaction"]
    assert (grant.amount_minor, grant.remaining_minor) == (500, 0)
    assert fake_stripe.objects["customer"][account.stripe_customer_id]["balance"] == -500
    assert selectors.credits_available(organization=org, at=timezone.now()) == 0
    assert services.credits_apply(organization=org, amount_minor=500, at=timezone.now()) == 0
    assert stripe_sync.credit_grants_push() == 0  # nothing left to move


def test_a_credit_pushed_twice_is_moved_once(fake_stripe):
    org, account = customer(fake_stripe)
    grant, _ = services.credit_grant(organization=org, amount_minor=300, reason="sorry")
    stale = CreditGrant.objects.get(pk=grant.pk)

    first = stripe_sync.credit_grant_push(grant=grant)
    # A second pusher read the grant before the first recorded it: Stripe replays the answer.
    assert stripe_sync.credit_grant_push(grant=stale) == first

    assert len(fake_stripe.objects["balance_transaction"]) == 1
    assert fake_stripe.objects["customer"][account.stripe_customer_id]["balance"] == -300
    assert (stale.stripe_transaction_id, stale.remaining_minor) == (first, 0)


def test_a_refused_grant_is_logged_and_the_others_still_go(fake_stripe, caplog):
    orgs = [customer(fake_stripe)[0] for _ in range(3)]
    grants = [
        services.credit_grant(organization=org, amount_minor=100 * (n + 1), reason="goodwill")[0]
        for n, org in enumerate(orgs)
    ]
    CreditGrant.objects.filter(pk=grants[0].pk).update(currency="")  # Stripe refuses it

    with caplog.at_level(logging.ERROR, logger="billing.stripe_sync"):
        assert stripe_sync.credit_grants_push() == 2

    refused, *pushed = (CreditGrant.objects.get(pk=grant.pk) for grant in grants)
    assert (refused.stripe_transaction_id, refused.remaining_minor) == ("", 100)
    assert all(grant.stripe_transaction_id and grant.remaining_minor == 0 for grant in pushed)
    assert f"credit grant {refused.pk} not pushed" in caplog.text
    for org, amount in zip(orgs[1:], (200, 300), strict=True):
        customer_id = BillingAccount.objects.get(organization=org).stripe_customer_id
        assert fake_stripe.objects["customer"][customer_id]["balance"] == -amount


def test_stripe_being_down_stops_the_credit_push_until_the_next_run(fake_stripe):
    orgs = [customer(fake_stripe)[0] for _ in range(2)]
    for org in orgs:
        services.credit_grant(organization=org, amount_minor=100, reason="goodwill")
    fake_stripe.fail_next(1, status=503)

    assert stripe_sync.credit_grants_push() == 0
    assert fake_stripe.faults_left() == 0
    assert len(fake_stripe.requests) == 1 + 2  # one try, after the two customers
    assert stripe_sync.credit_grants_push() == 2
