"""Budget: prices kept current, and annexes stopped at their budget (issue 16).

Once per cycle, before the annexes' steps: the price points are refreshed (the price file when
it changed, spot prices on ANNEX_PRICE_REFRESH), then each active annex is checked against its
annex_max_cost, its owner's ANNEX_BUDGET_PER_USER and the pool's ANNEX_BUDGET_PER_POOL. One
that reached a budget retires (RetireReason.BUDGET: it stops growing, its instances are
terminated by the annex's own retiring step) and its waiting jobs are held with a reason that
names the budget. The pool's spending per user is published as one `AnnexBudget` ad per user.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from annex_gahp import accounting, budgets, cost, lifecycle
from annex_gahp.controllers import Context, one_line
from annex_gahp.controllers.actions import Actions
from annex_gahp.hooks import budget_cron
from annex_gahp.lifecycle import RetireReason
from annex_gahp.store import Annex

log = logging.getLogger(__name__)

BUDGET_MYTYPE = "AnnexBudget"


def stopped_message(annex: Annex, why: str) -> str:
    return (
        f"annex {annex.name} stopped: {why}. Its instances are terminated. condor_rm these "
        "jobs, or condor_release them once there is budget left (a new annex)."
    )


class Budget:
    def __init__(self, ctx: Context, actions: Actions) -> None:
        self.ctx = ctx
        self.actions = actions
        self._published_at = -1.0
        self._user: budgets.Budget | None = None
        self._pool: budgets.Budget | None = None
        self._owners: dict[str, cost.Cost] = {}
        self._pool_spent: cost.Cost | None = None
        self._table: cost.Prices = {}

    def begin_cycle(self, annexes: list[Annex]) -> None:
        """Once per cycle, before the steps: prices refreshed, spending per owner and of the
        pool computed (as of the last cycle's records), the budget ads published."""
        now = self.ctx.now()
        settings = self.ctx.settings
        self._refresh_prices(now)
        self._user = budgets.parse("ANNEX_BUDGET_PER_USER", settings.budget_per_user)
        self._pool = budgets.parse("ANNEX_BUDGET_PER_POOL", settings.budget_per_pool)
        self._owners: dict[str, cost.Cost] = {}
        self._pool_spent: cost.Cost | None = None
        capped = any(a.spec.max_cost for a in annexes if a.state in lifecycle.ACTIVE)
        self._table: cost.Prices = {}
        if not (capped or self._user or self._pool):
            self._write_submit_view(annexes, now)
            return
        store = self.ctx.store
        self._table = accounting.price_table(store)
        periods = [b.period for b in (self._user, self._pool) if b]
        history = accounting.usages(store, since=now - max(periods)) if periods else []
        if self._pool:
            self._pool_spent = accounting.spent(history, self._table, now - self._pool.period)
        if self._user:
            for owner in {a.owner for a in annexes} | {u.owner for u in history}:
                self._owners[owner] = accounting.spent(
                    history, self._table, now - self._user.period, owner
                )
        self._publish(self._user, self._owners, self._pool, self._pool_spent)
        self._write_submit_view(annexes, now)

    def check(self, annex: Annex, now: int) -> Annex:
        """One annex's step, after its instances were recorded this cycle: at its budget, it
        retires (and launches nothing more)."""
        if annex.state not in lifecycle.ACTIVE or not (annex.spec.max_cost or self._owners
                                                       or self._pool_spent):  # fmt: skip
            return annex
        why = self._reached(
            annex,
            self._table,
            user_budget=self._user,
            owners=self._owners,
            pool_budget=self._pool,
            pool_spent=self._pool_spent,
        )
        return self._stop(annex, why, now) if why else annex

    def _reached(
        self,
        annex: Annex,
        table: cost.Prices,
        *,
        user_budget: budgets.Budget | None,
        owners: dict[str, cost.Cost],
        pool_budget: budgets.Budget | None,
        pool_spent: cost.Cost | None,
    ) -> str | None:
        if annex.spec.max_cost:
            so_far = accounting.annex_cost(self.ctx.store, annex, table).so_far
            cap = float(annex.spec.max_cost)
            if so_far.amount >= cap:
                return (
                    f"it reached its annex_max_cost = {annex.spec.max_cost} "
                    f"({budgets.money(so_far.amount)} {so_far.currency} spent)"
                )
        if user_budget and owners.get(annex.owner, cost.Cost()).amount >= user_budget.amount:
            used = owners[annex.owner].amount
            return (
                f"{annex.owner} reached the budget ANNEX_BUDGET_PER_USER = {user_budget.shown()}"
                f" ({budgets.money(used)} {user_budget.currency} spent)"
            )
        if pool_budget and pool_spent is not None and pool_spent.amount >= pool_budget.amount:
            return (
                f"the pool reached its budget ANNEX_BUDGET_PER_POOL = {pool_budget.shown()}"
                f" ({budgets.money(pool_spent.amount)} {pool_budget.currency} spent)"
            )
        return None

    def _stop(self, annex: Annex, why: str, now: int) -> Annex:
        log.warning("annex %s: %s; retiring it", annex.key, why)
        annex = self.ctx.store.update_annex(annex.id, last_error=f"stopped: {why}")
        try:
            self.ctx.demand.hold(annex.owner, annex.name, stopped_message(annex, why))
        except Exception as err:  # the schedd's failure must not keep the spending going
            log.warning("could not hold the jobs of %s: %s", annex.key, one_line(err))
        return self.actions.retire(annex, RetireReason.BUDGET, now)

    def _refresh_prices(self, now: int) -> None:
        if self.ctx.prices is None:
            return
        spot: dict[str, set[str]] = defaultdict(set)
        # One query for the pool: the instances seen lately (a live one is seen every cycle).
        recently = now - max(3 * self.ctx.settings.reconcile_interval, 600)
        for record, _owner, _name, region in self.ctx.store.all_instances(since=recently):
            if record.lifecycle == cost.SPOT and record.state in lifecycle.INSTANCE_LIVE:
                spot[region].add(record.instance_type)
        try:
            self.ctx.prices.refresh(self.ctx.store, dict(spot), now)
        except Exception as err:  # a bad price file: said in the log, the loop goes on
            log.warning("could not refresh prices: %s", one_line(err))

    def _write_submit_view(self, annexes: list[Annex], now: int) -> None:
        """What condor_submit's budget requirement needs, for the schedd's cron job
        (hooks/budget_cron.py): what is left, the prices, the live annexes (joining one is
        judged by its growth, here, not by its whole request)."""
        settings = self.ctx.settings
        view: dict[str, Any] = {"updated": now}
        if self._user or self._pool:
            view.update(
                submit_view(
                    self._user,
                    self._owners,
                    self._pool,
                    self._pool_spent,
                    accounting.submit_prices(self.ctx.store, settings, now),
                )
            )
            view["live"] = {f"{a.owner}/{a.name}": True for a in annexes
                            if a.state in lifecycle.ACTIVE}  # fmt: skip
            view["region"] = settings.region or ""
            view["types"] = list(settings.default_instance_types)
            view["lease"] = settings.default_lease
        try:
            budget_cron.write(settings.state_dir, view)
        except OSError as err:
            log.warning("could not write the budget view for condor_submit: %s", one_line(err))

    def _publish(
        self,
        user_budget: budgets.Budget | None,
        owners: dict[str, cost.Cost],
        pool_budget: budgets.Budget | None,
        pool_spent: cost.Cost | None,
    ) -> None:
        """One AnnexBudget ad per user (and one for the pool), every UPDATE_INTERVAL."""
        publisher = self.ctx.budget_ads
        clock = self.ctx.clock()
        if publisher is None or clock - self._published_at < self.ctx.settings.update_interval:
            return
        views: list[dict[str, Any]] = []
        for owner, used in sorted(owners.items()):
            if user_budget is not None:
                views.append(budget_view(owner, "ANNEX_BUDGET_PER_USER", user_budget, used))
        if pool_budget is not None and pool_spent is not None:
            views.append(budget_view("", "ANNEX_BUDGET_PER_POOL", pool_budget, pool_spent))
        if not views:
            return
        # Not invalidated when a budget is removed: the collector drops them by themselves.
        lifetime = 3 * max(1, self.ctx.settings.update_interval)
        views = [{**view, "ClassAdLifetime": lifetime} for view in views]
        try:
            publisher.publish(views)
            self._published_at = clock
        except Exception as err:
            log.warning("could not publish the budget ads: %s", one_line(err))


def budget_view(owner: str, knob: str, budget: budgets.Budget, used: cost.Cost) -> dict[str, Any]:
    return {
        "Owner": owner,
        "BudgetKnob": knob,
        "Budget": budget.amount,
        "BudgetPeriod": budget.period,
        "BudgetText": budget.shown(),
        "Spent": round(used.amount, 6),
        "Remaining": round(budgets.left(budget, used.amount), 6),
        "Currency": budget.currency,
        "Unpriced": ", ".join(used.unpriced) or None,
    }


def submit_view(
    user_budget: budgets.Budget | None,
    owners: dict[str, cost.Cost],
    pool_budget: budgets.Budget | None,
    pool_spent: cost.Cost | None,
    prices: dict[str, float],
) -> dict[str, Any]:
    """The budgets' part of budget-submit.json (hooks/budget_cron.py reads it)."""
    view: dict[str, Any] = {"prices": prices}
    if user_budget is not None:
        view["user"] = user_budget.amount
        view["user_text"] = user_budget.shown()
        view["currency"] = user_budget.currency
        view["left"] = {o: round(budgets.left(user_budget, c.amount), 6) for o, c in owners.items()}
    if pool_budget is not None and pool_spent is not None:
        view["pool_left"] = round(budgets.left(pool_budget, pool_spent.amount), 6)
        view["pool_text"] = pool_budget.shown()
        view.setdefault("currency", pool_budget.currency)
    return view
